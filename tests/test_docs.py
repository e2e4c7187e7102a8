"""The documentation's runnable snippets run as printed."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _block(page: str, first_line: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / page).read_text(), flags=re.S)
    (block,) = [b for b in blocks if b.startswith(first_line)]
    return block


def test_python_api_script_runs_as_printed(tmp_path):
    script = tmp_path / "compress_a_model.py"
    script.write_text(_block("python-api.md", "# compress_a_model.py").replace(
        '"reports/', f'"{ROOT.as_posix()}/reports/'))
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.search(r"[\d.]+x smaller, test RMSE [\d.]+ \(the fine-tuned control: [\d.]+\)", proc.stdout), proc.stdout
    assert (tmp_path / "model_gptq8.kanb").stat().st_size > 0
