"""lbproxy: a websocket-aware L4/L7 load balancer."""

__version__ = "0.1.0"
