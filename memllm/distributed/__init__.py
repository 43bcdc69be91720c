"""Work spread beyond one process: `ray_docs` answers many documents on a Ray cluster (optional extra
`memllm[ray]`; ray is imported only when used)."""
