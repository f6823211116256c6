"""The embedserve server: gRPC transport, continuous-batching engine and model adapters.

Data flows one way: ``api`` (transport) -> ``engine`` (scheduling, batching) -> ``models``
(adapters that know what each model family needs) and back.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("embedserve")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
