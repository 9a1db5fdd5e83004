"""candle_dist: the Candle method (long-tailed CLIP adaptation) at very many classes."""

from candle_dist.errors import UserInputError

__version__ = "0.1.0"
__all__ = ["UserInputError", "__version__"]
