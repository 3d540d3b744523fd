"""The GPU check kit (issue 17): made on a CPU machine by ``gpu_check.py prepare``, run on a GPU by ``gpu_check.sh``.

Modules: ``layout`` (what the kit folder holds), ``image`` (the GPU machine's packages, the wheels that travel,
the import audit), ``prepare`` (texts, token shards, model configs, wheels), ``models`` (random-weight models
of a real shape), ``flops`` (the FLOP count), ``embed`` (the embed path as an encoder actor runs it),
``st_bench`` (``SentenceTransformer.encode``), ``reference`` (the CPU float32 reference), ``checks`` (OOM
back-off, profile), ``full`` (real MiniLM and ``embedpipe run`` on a normal install), ``results`` (the JSON).
"""
