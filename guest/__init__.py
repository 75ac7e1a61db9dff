"""What runs inside the sandbox VM: the guest agent and the image recipe."""
