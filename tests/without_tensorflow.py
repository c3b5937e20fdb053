"""Run a script or code with TensorFlow made unimportable: python tests/without_tensorflow.py SCRIPT ARGS...,
or -c CODE. Any import of tensorflow (or a module of it) raises ImportError, as where it is not installed."""
import runpy
import sys


class RefuseTensorFlow:
    """A meta path finder, first on sys.meta_path, that refuses TensorFlow and finds nothing else."""

    def find_spec(self, name, path=None, target=None):
        if name == "tensorflow" or name.startswith("tensorflow."):
            raise ImportError(f"{name} is made unimportable by tests/without_tensorflow.py")
        return None


sys.meta_path.insert(0, RefuseTensorFlow())
if sys.argv[1] == "-c":
    code = sys.argv[2]
    sys.argv = ["-c", *sys.argv[3:]]
    exec(compile(code, "<string>", "exec"), {"__name__": "__main__"})
else:
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
