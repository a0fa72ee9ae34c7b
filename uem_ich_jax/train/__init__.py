"""The trainer: one loop for every stage on a device mesh, with Orbax checkpoints.

Entry points: `trainer.train(config, workdir)` and `trainer.evaluate(workdir)`
(the `uem-ich train` and `uem-ich evaluate` commands), and
`checkpoint.restore_model(workdir, step=None)` for inference. Configs come from
`configs/*.py` through `config_file.load("FILE.py[:ARG]", overrides)`.
"""
