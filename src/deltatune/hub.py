"""Adapters on the Hugging Face Hub: a `model_id` that is not a local folder is a Hub repo id, resolved through
`huggingface_hub`'s cache (so `HF_HUB_OFFLINE=1` reads what is cached and never touches the network)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from deltatune.config import CONFIG_NAME
from deltatune.errors import CheckpointError, UnsupportedArgumentError
from deltatune.io import WEIGHTS_NAME


def adapter_dir(model_id: str | Path, subfolder: str | None = None, revision: str | None = None) -> Path:
    """The local folder holding the adapter's two files: `model_id[/subfolder]` when it exists, else the Hub cache's
    snapshot of repo `model_id` at `revision` (downloaded unless offline)."""
    local = Path(model_id) / subfolder if subfolder else Path(model_id)
    if local.is_dir():
        if revision not in (None, "main"):
            raise UnsupportedArgumentError(f"revision={revision!r} given for the local folder {local}; remove it.")
        return local
    if Path(model_id).is_absolute() or str(model_id).count("/") != 1:
        raise CheckpointError(f"{local} is not a folder, and {str(model_id)!r} is not a Hub repo id (user/name).")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        paths = [
            Path(hf_hub_download(str(model_id), name, subfolder=subfolder, revision=revision))
            for name in (CONFIG_NAME, WEIGHTS_NAME)
        ]
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        raise CheckpointError(
            f"adapter {model_id!r} (revision {revision or 'main'}) is neither a local folder nor available from the "
            f"Hub{' cache (offline mode)' if _offline() else ''}: {type(exc).__name__}: {exc}"
        ) from None
    return paths[0].parent


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def push_adapter(
    save: Callable[[Path], None],
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str = "Upload adapter with deltatune",
    create_pr: bool = False,
) -> object:
    """Save with `save(folder)` into a fresh temporary folder and upload exactly that folder (the adapter's files,
    never the base model) to `repo_id`, creating the repo if needed. Returns huggingface_hub's commit info."""
    import tempfile

    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        save(Path(folder))
        return api.upload_folder(
            repo_id=repo_id, folder_path=folder, commit_message=commit_message, revision=revision, create_pr=create_pr
        )


def write_model_card(directory: Path, base_model: str | None, peft_type: str, transformers_model: bool = False) -> None:
    """Create or update `README.md` in an adapter folder: the YAML header the Hub reads (`library_name: peft`, since
    the files are peft's format; `base_model` and its `base_model:adapter:` tag when the base has a name, never an
    empty one; tags, `transformers` for a transformers base) with the body left as it was."""
    import yaml

    from deltatune.io import atomic_write_bytes

    path = directory / "README.md"
    header: dict = {}
    body = f"\n# {directory.name}\n\nA {peft_type} adapter in peft's format, saved with deltatune.\n"
    if path.is_file():
        text = path.read_text()
        if text.startswith("---\n") and "\n---\n" in text[4:]:
            raw, body = text[4:].split("\n---\n", 1)
            header = yaml.safe_load(raw) or {}
        else:
            body = "\n" + text
    header["library_name"] = "peft"
    tags = {*header.get("tags", []), "deltatune", peft_type.lower(), *(["transformers"] if transformers_model else [])}
    if base_model:
        header["base_model"] = base_model
        tags.add(f"base_model:adapter:{base_model}")  # the Hub links the adapter to its base by this tag
    header["tags"] = sorted(tags)
    atomic_write_bytes(path, f"---\n{yaml.safe_dump(header, sort_keys=True)}---\n{body}".encode())
