"""The flat module paths of ladder_clip before its layers, kept for users and old imports: each
old file is two lines naming the module(s) that now hold its code (the layers: ladder_clip/__init__.py).
Nothing in the layers imports an old path."""
import importlib
import sys
import types


class _Joined(types.ModuleType):
    """An old module whose names now live in several modules: a name is read from the first that has it.
    Setting one (monkeypatch.setattr) sets it in every one that has it, where the code reads it (a name one
    module imported from another is read in both); deleting it again (monkeypatch's undo) puts their own
    values back."""

    def __getattr__(self, name):
        for module in self.__dict__["_targets"]:
            if hasattr(module, name):
                return getattr(module, name)
        raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")

    def __setattr__(self, name, value):
        owners = [m for m in self.__dict__.get("_targets", ()) if hasattr(m, name)]
        if owners:
            self.__dict__["_replaced"].setdefault(name, [(m, getattr(m, name)) for m in owners])
            for module in owners:
                setattr(module, name, value)
        super().__setattr__(name, value)

    def __delattr__(self, name):
        for module, value in self.__dict__["_replaced"].pop(name, ()):
            setattr(module, name, value)
        super().__delattr__(name)

    def __dir__(self):
        return sorted({n for m in self.__dict__["_targets"] for n in dir(m)} | set(self.__dict__))


def alias(name: str, *targets: str) -> None:
    """Makes the old path `name` the module `targets[0]` itself (so a monkeypatch through it lands where
    the code reads the name), or, for several targets, a _Joined view of them."""
    modules = [importlib.import_module(t) for t in targets]
    if len(modules) == 1:
        sys.modules[name] = modules[0]
        return
    old = sys.modules[name]
    old.__dict__.update(_targets=modules, _replaced={})
    old.__class__ = _Joined
