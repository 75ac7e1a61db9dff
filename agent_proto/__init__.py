"""Generated protobuf modules for ttrpc, containerd and the husk/Kata guest agent."""
