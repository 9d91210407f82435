"""Models by name: `--model ORG/NAME` from the Hugging Face cache, fetched when the hub answers.

`snapshot_download` does the work: it fills the cache under $HF_HOME (default
~/.cache/huggingface) in its own layout (`hub/models--ORG--NAME/snapshots/<rev>/`, `refs/main`),
resumes an interrupted download, and when the hub cannot be reached (or HF_HUB_OFFLINE=1) it
returns the cached snapshot instead. What is neither cached nor reachable is one line saying
what to do. The recipes' models also ship their published config.json (`published/`), so a
memory plan needs neither the network nor the weights.
"""

from __future__ import annotations

from pathlib import Path

from tunix_sglang.config import check_model_choice, check_model_name
from tunix_sglang.errors import UserError
from tunix_sglang.models import missing_weight_files

# What a model directory needs (models.inspect_model_dir); no other formats, no extras.
FILES = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "tokenizer*"]
PUBLISHED = Path(__file__).resolve().parent / "published"


def _cache_dir() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _unavailable(name: str, why: str) -> UserError:
    return UserError(
        f"--model {name}: {why}; where the hub is reachable run `huggingface-cli download "
        f"{name}` (same HF_HOME, or copy {_cache_dir()} here), or pass --local-model-dir DIR")


def fetch(name: str) -> Path:
    """The model's directory in the Hugging Face cache, downloaded (or completed) first when
    the hub is reachable; the cached copy when it is not."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    check_model_name(name)
    try:
        path = Path(snapshot_download(name, allow_patterns=FILES))
    except GatedRepoError:
        raise UserError(f"--model {name}: gated on the hub; accept its licence on "
                        "huggingface.co and run `huggingface-cli login`") from None
    except RepositoryNotFoundError:
        raise UserError(f"--model {name}: no such model on the Hugging Face hub (or it is "
                        "private: huggingface-cli login)") from None
    except LocalEntryNotFoundError:
        raise _unavailable(name, f"not in the Hugging Face cache ({_cache_dir()}) and the "
                           "hub cannot be reached") from None
    if (not (path / "config.json").is_file() or not list(path.glob("*.safetensors"))
            or missing_weight_files(path)):
        raise _unavailable(name, f"the cached copy {path} is incomplete (config.json or "
                           "weight files missing) and the hub cannot be reached to finish it")
    return path


def published_config(name: str) -> Path | None:
    """The shipped config.json of a recipe's model, if this package has it."""
    path = PUBLISHED / name.replace("/", "--") / "config.json"
    return path if path.is_file() else None


def config_json(name: str) -> tuple[Path, str]:
    """(config.json, where it came from) for a plan: the cached copy the run would use, the
    shipped one, or config.json alone from the hub."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    check_model_name(name)
    cached = try_to_load_from_cache(name, "config.json")
    if isinstance(cached, str):
        return Path(cached), "Hugging Face cache"
    shipped = published_config(name)
    if shipped is not None:
        return shipped, "shipped with tunix-sglang (published config.json)"
    try:
        return Path(hf_hub_download(name, "config.json")), "Hugging Face hub"
    except Exception as e:  # unreachable, not found, gated: all mean "no config here"
        raise _unavailable(name, f"no config.json cached or shipped, and the hub said "
                           f"{type(e).__name__}") from None


def model_dir(local_model_dir: str | None, model: str | None) -> Path:
    """The run's model directory: --local-model-dir, else --model fetched by name, else the
    embedded default."""
    check_model_choice(local_model_dir, model)
    if local_model_dir:
        return Path(local_model_dir).expanduser()
    if model:
        return fetch(model)
    from tunix_sglang.warmstart import embedded_model_dir

    return embedded_model_dir()
