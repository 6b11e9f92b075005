"""Adapters to other training frameworks, each imported only when used (its framework is an optional extra):

- ``torchdkm.integrations.hf_trainer.DKMTrainerCallback``: Hugging Face ``transformers.Trainer``.
"""
