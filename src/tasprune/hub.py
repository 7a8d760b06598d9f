"""Share a pruned model as a Hugging Face Hub repository: `save_pretrained` /
`from_pretrained`.

A saved directory holds `model.safetensors` (weights, the shape in its metadata),
`shape.json`, `config.json` (library, shape, FLOPs, params) and `README.md`, a model
card with the run's summary table and search settings when they are known. Loading
a local directory needs nothing beyond tasprune; a Hub repository id is downloaded
with `huggingface_hub` (`pip install 'tasprune[hub]'`), only when asked for, and so
is pushing (`push_to_hub=True`).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from tasprune._io import atomic_write_text, read_json
from tasprune._version import __version__
from tasprune.export import SHAPE_FILE, WEIGHTS_FILE, load_model, save_pruned
from tasprune.net.surgery import shape_of
from tasprune.report import format_summary

CONFIG_FILE = "config.json"
CARD_FILE = "README.md"
FILES = (WEIGHTS_FILE, SHAPE_FILE, CONFIG_FILE, CARD_FILE)


def _hub() -> Any:
    try:
        import huggingface_hub
    except ImportError:
        raise ModuleNotFoundError("the Hugging Face Hub needs the huggingface_hub package: "
                                  "pip install 'tasprune[hub]'") from None
    return huggingface_hub


def _check_target(out: Path) -> None:
    """Refuse a directory that holds anything but an earlier save_pretrained's files."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file; give a directory to save the model into")
    if not out.is_dir() or not any(out.iterdir()):
        return
    others = sorted(p.name for p in out.iterdir() if p.name not in FILES)
    ours = False
    with contextlib.suppress(OSError, ValueError):
        config = json.loads((out / CONFIG_FILE).read_text())
        ours = isinstance(config, dict) and config.get("library_name") == "tasprune"
    if others or not ours:
        names = sorted(p.name for p in out.iterdir())
        held = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
        raise ValueError(f"{out} holds files that are not an earlier export of a model "
                         f"({held}); choose a new or empty directory")


def save_pretrained(model: nn.Module, save_directory: str | os.PathLike[str], *,
                    summary: Mapping[str, Any] | None = None,
                    settings: Mapping[str, Any] | None = None, push_to_hub: bool = False,
                    repo_id: str | None = None, private: bool = False) -> Path:
    """Write the model in Hub layout into `save_directory` (created); return it.

    `summary` (a run's summary.json) and `settings` (a run's config.yaml as a dict) go
    into the model card. `push_to_hub` uploads the directory to `repo_id` (created if
    needed; needs a Hub token), the one network access of this module."""
    out = Path(save_directory)
    _check_target(out)
    out.mkdir(parents=True, exist_ok=True)
    save_pruned(out, model)
    shape = shape_of(model)
    config = {"library_name": "tasprune", "tasprune_version": __version__,
              "architecture": shape.describe(), "flops": shape.count("flops"),
              "params": shape.count("params"), "shape": shape.to_dict()}
    atomic_write_text(out / CONFIG_FILE, json.dumps(config, indent=1) + "\n")
    atomic_write_text(out / CARD_FILE, model_card(model, summary, settings))
    if push_to_hub:
        if not repo_id:
            raise ValueError("push_to_hub needs repo_id (e.g. 'user/resnet20-tas-50')")
        hub = _hub()
        api = hub.HfApi()
        api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(out),
                          commit_message=f"tasprune {__version__}: {shape.describe()}")
    return out


def from_pretrained(name_or_path: str | os.PathLike[str], *, revision: str | None = None,
                    cache_dir: str | os.PathLike[str] | None = None,
                    device: str | torch.device = "cpu") -> nn.Module:
    """Load a model saved by `save_pretrained`: a local directory, or else a Hub repository
    id (downloaded with huggingface_hub into its cache)."""
    path = Path(name_or_path)
    if path.is_dir():
        return load_model(path, device=device)
    local = path.exists() or path.parent.is_dir() and str(path.parent) != "."
    if local or str(name_or_path).count("/") != 1:  # runs/x with runs/ here: a local path
        raise FileNotFoundError(f"{name_or_path}: not a directory saved by save_pretrained, "
                                "nor a Hub repository id of the form 'user/name'")
    local = _hub().snapshot_download(repo_id=str(name_or_path), revision=revision,
                                     cache_dir=cache_dir, allow_patterns=list(FILES))
    return load_model(local, device=device)


def model_card(model: nn.Module, summary: Mapping[str, Any] | None = None,
               settings: Mapping[str, Any] | None = None) -> str:
    """A Hub model card (README.md with YAML front matter) for `model`."""
    shape = shape_of(model)
    front = {"library_name": "tasprune", "tags": ["pruning", "tas", "image-classification"],
             "pipeline_tag": "image-classification"}
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# {shape.describe()}", "",
             "A convolutional network pruned by Transformable Architecture Search (TAS) with "
             f"[tasprune](https://pypi.org/project/tasprune/) {__version__}.", "",
             f"- FLOPs (multiply-accumulates): {shape.count('flops'):,}",
             f"- parameters: {shape.count('params'):,}",
             f"- blocks per stage: {', '.join(map(str, shape.blocks))}",
             f"- input: {shape.in_channels} x {shape.resolution} x {shape.resolution}, "
             f"{shape.num_classes} classes", ""]
    if summary:
        lines += ["## Results", "",
                  f"Model `{summary.get('model')}` on `{summary.get('data')}`, method "
                  f"`{summary.get('method')}`:", "", "```", format_summary(dict(summary)),
                  "```", ""]
    if settings:
        keep = {k: settings[k] for k in ("model", "data", "method", "search", "train")
                if k in settings}
        lines += ["## Settings", "", "```yaml", yaml.safe_dump(keep, sort_keys=False).strip(),
                  "```", ""]
    lines += ["## Use", "", "```python", "import tasprune", "",
              "model = tasprune.from_pretrained(\"PATH_OR_REPO_ID\")  # eval mode", "```", "",
              "`model.safetensors` holds the weights with the shape in its metadata; "
              "`shape.json` the pruned widths and depths.", ""]
    return "\n".join(lines)


def run_card_inputs(run_dir: str | os.PathLike[str]
                    ) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(summary.json, config.yaml) of a run directory, each None when absent."""
    run = Path(run_dir)
    summary = read_json(run / "summary.json") if (run / "summary.json").is_file() else None
    settings = None
    if (run / "config.yaml").is_file():
        try:
            loaded = yaml.safe_load((run / "config.yaml").read_text())
        except yaml.YAMLError:
            loaded = None
        settings = loaded if isinstance(loaded, dict) else None
    return summary, settings
