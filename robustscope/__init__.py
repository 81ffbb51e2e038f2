"""The user tools: the command line, the API client and the reproduction runner."""
