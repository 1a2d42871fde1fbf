"""Errors raised by tl_reward.

Every error is a :class:`TLRewardError` and also inherits the builtin a caller would expect
(``ValueError``, ``TypeError``, ``KeyError``), so ``except ValueError`` keeps working.
"""


class TLRewardError(Exception):
    """Base class of every error tl_reward raises on purpose."""


class ModelSourceError(TLRewardError, ValueError):
    """The model argument is neither an HF model object nor a local ``save_pretrained`` directory."""


class NotARewardModelError(TLRewardError, TypeError):
    """The model has no sequence-classification (score) head."""


class UnsupportedArchitectureError(TLRewardError, ValueError):
    """The architecture has no adapter in the registry."""


class UnsupportedConfigError(TLRewardError, ValueError):
    """An HF config value changes the forward pass in a way the adapter does not reproduce."""


class ObjectiveError(TLRewardError, ValueError):
    """A multi-objective head was used where a scalar reward is needed, or a bad objective."""


class InvalidInputError(TLRewardError, ValueError):
    """Bad tokens, masks or texts: empty, too long, out of the vocabulary, mismatched counts."""


class DeviceError(TLRewardError, ValueError):
    """A device that is not a torch device, or that this torch build or machine does not have."""


class HookNameError(TLRewardError, KeyError):
    """A hook name that the model does not have."""


class SAEMismatchError(TLRewardError, ValueError):
    """An SAE that does not fit the model: unknown hook, wrong width, device or dtype, no hook name."""


class NotAnSAEError(TLRewardError, TypeError):
    """An object that is not a sae-lens ``SAE`` was passed where one is needed."""


class InsufficientMemoryError(TLRewardError, MemoryError):
    """One sequence's working memory for a tool exceeds the memory available on the device."""


class HeadError(TLRewardError, ValueError):
    """A reward head that does not fit the model (width, outputs), or a published head layout
    that cannot be read."""


class LinearHeadRequiredError(TLRewardError, TypeError):
    """A tool that reads the linear head's weights (``W_R``) was given a model whose head is
    nonlinear (an MLP, a gated head, a user's module)."""
