"""koolbase-ota: a self-hostable over-the-air update server for Flutter apps."""

__version__ = "0.1.0"
