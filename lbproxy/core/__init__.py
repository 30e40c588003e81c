"""The sans-IO core: pools, balancing, HTTP/1.1 heads, websocket frames, retry and tunnel rules."""
