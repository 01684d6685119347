"""Optional packages stay optional: importing fastkd never reaches for them."""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# records every import of these packages that is attempted (installed or not), with who asked
PROBE = """
import sys, traceback
OPTIONAL = ("sklearn", "scipy", "matplotlib", "wandb", "mlflow")
asked = []

class Recorder:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in OPTIONAL:
            frames = [f for f in traceback.extract_stack() if not f.filename.startswith("<")]
            asked.append((name, f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"))
        return None

sys.meta_path.insert(0, Recorder())
import fastkd, fastkd.cli, fastkd.train.run, fastkd.data
import fastkd.train.loggers, fastkd.train.metrics, fastkd.train.progress
for name, where in asked:
    print("asked for", name, "at", where)
print("loaded", sorted(m for m in sys.modules if m.split(".")[0] in OPTIONAL))
"""


def test_import_leaves_sklearn_scipy_matplotlib_and_loggers_alone():
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["loaded []"], proc.stdout
