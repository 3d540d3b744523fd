"""embedpipe's click launcher: parse, load the config, call one library function, map errors to exit codes."""
