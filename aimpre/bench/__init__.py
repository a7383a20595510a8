"""The benches of ``aimpre bench``, one module each: ``attention`` (our Triton kernel against its peers), ``ops``
(the fused ops, torch against liger-kernel), ``step`` (one training step, plain against ours), ``fp8`` (float8
training's loss against bf16), ``loader`` (our data pipeline against a plain webdataset one) and ``fit`` (the
scaling-law fit against a scipy loop), with ``timing``, the timers and report helpers they share.

Benches import the wings they measure (kernels, model, data, train, scaling); nothing in those wings imports a bench
(tests/test_bench_wing.py checks it).
"""
