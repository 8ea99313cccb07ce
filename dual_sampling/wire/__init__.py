"""One module per wire protocol, shared by the server plugin and its clients."""
