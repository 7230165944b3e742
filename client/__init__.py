"""Talking to a ComfyUI server: HTTP/websocket client, workflow format conversion, embedded server."""
