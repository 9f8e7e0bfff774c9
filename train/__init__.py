"""Training: corpus -> vocabulary -> TBPTT batches -> RecurrentLM -> checkpoint (needs torch)."""

import sys as _sys
import types as _types


class _CallableModule(_types.ModuleType):
    """`lstmgen.NAME(...)` calls lstmgen.api.NAME: the package is also the function (lstmgen/api.py)."""

    def __call__(self, *args, **kwargs):
        from lstmgen import api
        return getattr(api, self.__name__.rsplit(".", 1)[1])(*args, **kwargs)


_sys.modules[__name__].__class__ = _CallableModule
