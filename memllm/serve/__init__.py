"""serve subpackage: the HTTP server over the library (`memllm serve`); imported only on demand."""
