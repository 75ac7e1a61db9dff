"""ttrpc (containerd's lightweight RPC) on trio streams."""
