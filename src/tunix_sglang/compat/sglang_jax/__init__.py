"""Fixes to released sglang-jax (0.0.2) for an in-process engine on CPU, by subsystem.

`process` (side effects on the host process), `sampler`, `logprobs`, `attention`,
`cpu_forward` (attention per sequence and the output head's layout on CPU), `model_runner`.
Each fix is a pair: `<name>_needed()` inspects the installed code (source text, attributes or
behaviour) and says whether the problem is there; `fix_<name>()` patches it, keeps the
replaced callable in `compat.base.ORIGINALS` and returns True when it patched.
`tunix_sglang.compat.FIXES` lists them in the order they are applied.

These are monkeypatches of this process only. The engine runs with
`enable_single_process=True`: scheduler and detokenizer are threads of this process (no
"spawn" children, tests/test_engine.py checks it), so patching here is enough. The engine's
own runtime inside the scheduler thread is not a fix: `tunix_sglang.engine.scheduler_hooks`.
Two problems are avoided by configuration, in `tunix_sglang.engine.settings`: page_size > 1
gives wrong attention on CPU, and the engine's tokenizer returned wrong output ids
(`skip_tokenizer_init=True`).
"""
