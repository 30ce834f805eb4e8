"""s5scale: pretrain deep stacks of S5 state-space layers on raw audio and text."""

__version__ = "0.1.0"
