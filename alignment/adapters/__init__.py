"""Adapters beyond LoRA: the PEFT menu, seed 003's Bottleneck Adapter, BitFit, prompt tuning, and
base weights trained in full (the projector stage). `menu.METHODS` lists what recipes may pick."""

from alignment.adapters.menu import METHODS, OWN_METHODS, PEFT_METHODS, check_method

__all__ = ["METHODS", "OWN_METHODS", "PEFT_METHODS", "check_method"]
