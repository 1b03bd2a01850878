"""The transport: websocket + msgpack server and a torch-free robot client; knows no model."""
