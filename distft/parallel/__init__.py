"""Parallelism beyond data parallel on the FSDP2 family's one device mesh: the mesh itself
(`mesh`), context parallelism (`cp`, Ulysses) and tensor parallelism (`tp`)."""
