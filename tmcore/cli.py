"""The ``tmcore`` command: ``bench``, ``eval``, ``visualize``, ``plugins`` and ``new-plugin``."""

from __future__ import annotations

import argparse
import ast
import json
import os
import pickle
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

from tmcore.bench import COMPILE_MODES
from tmcore.errors import TmcoreError

__all__ = ["main", "parse_reducer_spec", "load_model"]

DEFAULT_MODEL = "fmnist-vit"
_IMAGE_FOLDER = "an ImageFolder, DIR/<class>/<image>"


class CliError(TmcoreError):
    """A bad command-line argument."""


class _UsageError(CliError):
    """argparse rejected the command line; ``prog`` is the (sub)command, e.g. ``tmcore bench``."""

    def __init__(self, prog: str, message: str) -> None:
        super().__init__(message)
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line for `main` to print, without the usage text
    and without exiting (``--help`` still prints and exits as usual). Subparsers inherit it."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(self.prog, message)


# -- argument types: a bad value fails while parsing, before any model is loaded or timed --------
def _int_at_least(minimum: int, note: str = "") -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum``; ``note`` says what a special value means."""
    allowed = f"allowed: an integer >= {minimum}{f' ({note})' if note else ''}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer; {allowed}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text} is out of range; {allowed}")
        return value

    return parse


def _accelerators() -> dict[str, int]:
    """Device type -> number of devices of the accelerators usable in this process."""
    import torch

    found: dict[str, int] = {}
    for kind in ("cuda", "xpu"):
        backend = getattr(torch, kind, None)
        if backend is not None and backend.is_available():
            found[kind] = backend.device_count()
    if torch.backends.mps.is_available():
        found["mps"] = 1
    return found


def _device_problem(text: str, accelerators: dict[str, int]) -> str | None:
    """Why ``text`` is no device to run a model on here, or None when it is one."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        return "not a torch device"
    if device.type == "cpu":
        return None
    if device.type == "meta":
        return "meta tensors hold no data, so nothing can be run or timed on them"
    count = accelerators.get(device.type, 0)
    if count == 0:
        return f"no {device.type} device is available here"
    if device.index is not None and device.index >= count:
        return f"there {'is 1 device' if count == 1 else f'are {count} devices'} of type {device.type} here"
    return None


def _device(text: str) -> str:
    """An argparse type: a torch device that exists here, so ``cuda`` on a CPU-only machine or
    ``cuda:7`` on a 1-GPU one fails at once instead of after the model is built."""
    if text == "cpu":  # the default: no torch import while parsing
        return text
    accelerators = _accelerators()
    problem = _device_problem(text, accelerators)
    if problem is None:
        return text
    allowed = ["cpu"] + [f"{k}, {k}:0" + (f" to {k}:{n - 1}" if n > 1 else "") for k, n in accelerators.items()]
    raise argparse.ArgumentTypeError(f"{text!r}: {problem}; allowed: {', '.join(allowed)}")


def _input_file(text: str) -> str:
    """An argparse type: an existing regular file (not a folder, a device, a pipe...)."""
    from tmcore.api import not_a_regular_file

    what = not_a_regular_file(text)
    if what == "does not exist":
        raise argparse.ArgumentTypeError(f"{text!r}: no such file")
    if what == "is a folder":
        raise argparse.ArgumentTypeError(f"{text!r} is a directory; allowed: a file")
    if what:
        raise argparse.ArgumentTypeError(f"{text!r} {what}; allowed: a regular file")
    return text


def _sentences_file(text: str) -> str:
    """An argparse type: a UTF-8 text file with at least one sentence, one per line."""
    _input_file(text)
    allowed = "allowed: UTF-8 text, one sentence per line"
    try:
        content = Path(text).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not UTF-8 (byte {exc.start}); {allowed}") from None
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: cannot read it ({exc.strerror or exc}); {allowed}") from None
    if not content.strip():
        raise argparse.ArgumentTypeError(f"{text!r} holds no sentences; {allowed}")
    return text


def _output_file(text: str) -> str:
    """An argparse type: a file that can be written, checked now so that a long benchmark does not
    end in an error (``os.path`` tests: they never raise, e.g. on a folder that cannot be read)."""
    folder = os.path.dirname(text) or "."
    if os.path.isdir(text):
        problem = f"{text!r} is a directory"
    elif not os.path.exists(folder):
        problem = f"{text!r}: directory {folder!r} does not exist"
    elif not os.path.isdir(folder):
        problem = f"{text!r}: {folder!r} is not a directory"
    elif not os.access(folder, os.W_OK | os.X_OK):
        problem = f"{text!r}: directory {folder!r} is not writable"
    elif os.path.exists(text) and not os.access(text, os.W_OK):
        problem = f"{text!r} exists and is not writable"
    else:
        return text
    raise argparse.ArgumentTypeError(f"{problem}; allowed: a file in an existing, writable directory")


def _extension_error(text: str, allowed: str) -> argparse.ArgumentTypeError:
    """The writer picks the format by the file's extension: refuse one it cannot write."""
    suffix = os.path.splitext(text)[1]
    found = f"extension {suffix!r}" if suffix else "no extension"
    return argparse.ArgumentTypeError(f"{text!r} has {found}; allowed: {allowed}")


def _plot_file(text: str) -> str:
    """An argparse type: a writable file in a format matplotlib writes (without an extension it
    would add ``.png``, and the path printed would not be the file written)."""
    _output_file(text)
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        raise argparse.ArgumentTypeError("needs matplotlib: pip install 'tmcore[cli]'") from None
    formats = sorted(FigureCanvasBase.get_supported_filetypes())
    if os.path.splitext(text)[1].lower().lstrip(".") not in formats:
        raise _extension_error(text, f"a file ending in {', '.join('.' + f for f in formats)}")
    return text


def _image_file(text: str) -> str:
    """An argparse type: a writable file in an image format PIL writes."""
    from PIL import Image

    _output_file(text)
    if Image.registered_extensions().get(os.path.splitext(text)[1].lower()) not in Image.SAVE:
        raise _extension_error(text, "an image file PIL writes, e.g. .png, .jpg, .webp, .tif")
    return text


def _image_folder(text: str) -> str:
    """An argparse type: an ImageFolder root (``DIR/<class>/<image>``) with images in every class
    folder, each identifiable by PIL (its header is read: a file damaged further in is reported
    by `tmcore.evaluate.image_folder` when it is read)."""
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a directory; allowed: {_IMAGE_FOLDER}")
    try:
        from PIL import Image
    except ImportError:
        raise argparse.ArgumentTypeError("needs Pillow and torchvision: pip install 'tmcore[cli]'") from None
    for path in _image_paths(text):
        try:
            with Image.open(path):
                pass
        except (OSError, Image.DecompressionBombError) as exc:  # UnidentifiedImageError is an OSError
            reason = "PIL cannot identify its format" if isinstance(exc, Image.UnidentifiedImageError) else exc
            raise argparse.ArgumentTypeError(f"{path!r} is not a readable image ({reason})") from None
    return text


def _image_paths(root: str) -> list[str]:
    """The images torchvision's ``ImageFolder`` would read under ``root``; an error, as it would
    give, when there is no class folder or a class folder has no image."""
    try:
        from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset
    except ImportError:
        raise argparse.ArgumentTypeError("needs torchvision: pip install 'tmcore[cli]'") from None
    try:
        classes, class_to_idx = find_classes(root)
    except FileNotFoundError:
        raise argparse.ArgumentTypeError(f"{root!r} has no class folders; allowed: {_IMAGE_FOLDER}") from None
    samples = make_dataset(root, class_to_idx, IMG_EXTENSIONS, allow_empty=True)
    empty = sorted(set(classes) - {classes[label] for _, label in samples})
    if empty:
        shown = ", ".join(map(repr, empty[:3])) + (f" and {len(empty) - 3} more" if len(empty) > 3 else "")
        raise argparse.ArgumentTypeError(
            f"{root!r}: no images in class folder{'s' if len(empty) > 1 else ''} {shown}; "
            f"allowed: {_IMAGE_FOLDER}, images ending in {', '.join(IMG_EXTENSIONS)}"
        )
    return [path for path, _ in samples]


def _one_line(exc: BaseException, limit: int = 300) -> str:
    """``Type: message`` on one line, cut at ``limit`` characters (a state-dict mismatch lists every key)."""
    text = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextmanager
def _writing(option: str, path: str) -> Iterator[None]:
    """An error writing an output checked up front (disk full, folder removed since) as one line."""
    try:
        yield
    except OSError as exc:
        raise CliError(f"{option} {path!r}: could not write it ({exc.strerror or exc})") from None


# -- arguments ---------------------------------------------------------------------------------
def _split_top(text: str, sep: str) -> list[str]:
    """Split on ``sep`` outside brackets, so ``r=(16,-1),8`` gives ``["r=(16,-1)", "8"]``."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == sep and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return parts


def _value(text: str) -> Any:
    """A Python literal, ``inf`` / ``-inf`` / ``nan`` (no literal spells them), or else the text."""
    if text.strip().lower().lstrip("+-") in ("inf", "infinity", "nan"):
        return float(text)
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_reducer_spec(spec: str) -> list[tuple[str, dict[str, Any]]]:
    """``NAME[:KEY=V1,V2,...[;KEY2=...]]`` -> one ``(name, config)`` per combination of values.

    ``tome:r=4,8,12`` is three settings; ``tome:r=(16,-1);prop_attn=False`` is one.
    """
    name, _, rest = spec.partition(":")
    if not name.isidentifier():
        raise CliError(f"--reducer {spec!r}: expected NAME[:KEY=VALUE[,VALUE...][;KEY=...]], e.g. tome:r=8,13")
    settings: list[dict[str, Any]] = [{}]
    seen: set[str] = set()
    for item in filter(None, _split_top(rest, ";")):
        key, eq, values = item.partition("=")
        key = key.strip()
        if not eq or not key.isidentifier() or not values:
            raise CliError(f"--reducer {spec!r}: {item!r} is not KEY=VALUE[,VALUE...]")
        if key in seen:  # the later value would silently win
            raise CliError(
                f"--reducer {spec!r}: key {key!r} is given twice; allowed: each key once, several values as {key}=V1,V2"
            )
        seen.add(key)
        options = [_value(v.strip()) for v in _split_top(values, ",")]
        settings = [{**s, key: v} for s in settings for v in options]
    return [(name, s) for s in settings]


def _settings(specs: Sequence[str] | None, files: Sequence[str] = ()) -> list[Any]:
    """Reducer settings from ``--reducer`` and ``--load`` (default: every installed reducer's
    example configs), validated against the registry before anything heavy is loaded."""
    import tmcore
    from tmcore.bench import Setting
    from tmcore.reducer import validate_config
    from tmcore.registry import registry

    loaded = [_load_setting(path) for path in files]
    if specs:
        settings = [Setting(name, cfg) for spec in specs for name, cfg in parse_reducer_spec(spec)]
    elif loaded:
        settings = []
    else:
        settings = [Setting(r.name, dict(c)) for r in tmcore.reducers().values() for c in r.obj.example_configs]
    settings += loaded
    for s in settings:
        validate_config(registry.get_reducer(s.reducer).obj, s.config)
    return settings


def _load_setting(path: str) -> Any:
    """The `Setting` saved in ``path`` (``--load``), a bad file named with the option."""
    from tmcore.bench import Setting

    try:
        return Setting.from_file(path)
    except TmcoreError as exc:  # tmcore.api's InvalidFileError names the file and what is wrong
        raise CliError(f"--load: {exc}") from None


def load_model(spec: str, pretrained: bool = False, checkpoint: str | None = None) -> Any:
    """A bundled model name, ``timm:NAME`` (``--checkpoint`` for local weights), a local
    transformers directory, or ``diffusers:PATH`` / ``diffusers:NAME``."""
    from tmcore import models

    if spec in models.available():
        return models.load(spec)
    kind, sep, name = spec.partition(":")
    if sep and kind == "diffusers":
        return _load_diffusers(spec, name)
    if sep and kind == "timm" and name:
        try:
            import timm
        except ImportError as exc:
            raise CliError("--model timm:...: timm is not installed (pip install 'tmcore[timm]')") from exc
        if not timm.is_model(name):
            raise CliError(f"--model {spec!r}: timm has no model {name!r} (see timm.list_models())")
        return _create_timm(timm, name, pretrained, checkpoint)
    path = Path(name if sep and kind == "hf" else spec)
    if path.is_dir() and (path / "config.json").exists():
        return _load_hf(path)
    if sep and kind == "hf":
        raise CliError(f"--model {spec!r}: {name!r} is not a directory with a config.json (save_pretrained output)")
    raise CliError(
        f"--model {spec!r}: expected a bundled model ({', '.join(models.available())}), timm:NAME, "
        f"hf:PATH (a local transformers model directory), or diffusers:PATH (a local diffusers model or pipeline)"
    )


def diffusers_configs() -> dict[str, Path]:
    """The model layouts tm-diffusers ships for ``--model diffusers:NAME`` (random weights)."""
    try:
        import tm_diffusers
    except ImportError:
        return {}
    return {p.stem: p for p in sorted((Path(tm_diffusers.__file__).parent / "configs").glob("*.json"))}


def _load_diffusers(spec: str, name: str) -> Any:
    """``diffusers:PATH``: a model folder (``config.json`` and, for trained weights, its
    safetensors), a pipeline folder (``model_index.json``: its ``unet`` or ``transformer``), or a
    layout tm-diffusers ships (``sd15-unet``, ``dit-xl-2-256``), built with random weights where the
    folder holds none. Only diffusers' own classes load: no code from the folder runs."""
    try:
        import diffusers
    except ImportError as exc:
        raise CliError(f"--model {spec!r}: diffusers is not installed (pip install 'tmcore[diffusers]')") from exc
    import tmcore

    shipped = diffusers_configs()
    path = shipped.get(name, Path(name))
    if path.is_dir() and (path / "model_index.json").exists():
        part = next((path / sub for sub in ("unet", "transformer") if (path / sub / "config.json").exists()), None)
        if part is None:
            raise CliError(f"--model {spec!r}: the pipeline in {str(path)!r} has no unet/ or transformer/ folder")
        path = part
    config_file = path / "config.json" if path.is_dir() else path
    if not config_file.is_file():
        raise CliError(
            f"--model {spec!r}: {name!r} is neither a diffusers model or pipeline folder nor one of the shipped "
            f"layouts ({', '.join(shipped) or 'tm-diffusers is not installed'})"
        )
    config = _json_object(config_file, spec)
    cls_name = config.get("_class_name")
    allowed = tmcore.adapters()["diffusers"].obj.model_classes if "diffusers" in tmcore.adapters() else ()
    if cls_name not in allowed:
        raise CliError(f"--model {spec!r}: {config_file.name} names class {cls_name!r}; allowed: {', '.join(allowed)}")
    cls = getattr(diffusers, cls_name)
    weights = path.is_dir() and any(path.glob("diffusion_pytorch_model*.safetensors"))
    try:
        if weights:
            model = cls.from_pretrained(path, local_files_only=True)
        else:
            model = cls.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    except Exception as exc:  # diffusers raises many kinds; the user needs the one line
        raise CliError(f"--model {spec!r}: diffusers could not build it ({_one_line(exc)})") from None
    model.tmcore_weights = "local weights" if weights else "random-init"
    return model.eval()


def _json_object(file: Path, spec: str) -> dict[str, Any]:
    """The JSON object in a model folder's ``file``, or a `CliError` naming ``--model spec``."""
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CliError(f"--model {spec!r}: cannot read {file.name} ({_one_line(exc)})") from None
    if not isinstance(config, dict):
        raise CliError(f"--model {spec!r}: {file.name} holds a JSON {type(config).__name__}; allowed: an object")
    return config


def _create_timm(timm: Any, name: str, pretrained: bool, checkpoint: str | None) -> Any:
    """``timm.create_model``, with weights from ``--checkpoint`` or the hub (``--pretrained``);
    a failure to load those weights is one line naming the option."""
    import torch
    from safetensors import SafetensorError

    kwargs = {"pretrained_cfg_overlay": {"file": checkpoint}} if checkpoint else {}
    # what loading weights can raise: unreadable or no checkpoint (torch.load's unpickler gives
    # KeyError / EOFError on text), another model's state dict (RuntimeError), no network (OSError)
    weights_errors = (OSError, EOFError, KeyError, ValueError, RuntimeError, pickle.UnpicklingError, SafetensorError)
    try:
        with torch.random.fork_rng():
            torch.manual_seed(0)  # random-init weights: the same model in every run
            return timm.create_model(name, pretrained=pretrained or bool(checkpoint), **kwargs).eval()
    except weights_errors as exc:
        if checkpoint:
            raise CliError(
                f"--checkpoint {checkpoint!r}: timm could not load it into {name} ({_one_line(exc)}); "
                "allowed: this model's weights as .safetensors, .pth or .bin"
            ) from None
        if pretrained:
            raise CliError(f"--pretrained: timm could not get the weights of {name} ({_one_line(exc)})") from None
        raise


def _load_hf(path: Path) -> Any:
    """The model class named by the directory's config (``architectures``: the task head it was
    saved with), else the bare ``AutoModel``; local files only, and never code from the folder."""
    try:
        import transformers
    except ImportError as exc:
        raise CliError(f"--model {path}: a transformers directory needs transformers installed") from exc
    for name in ("config.json", "tokenizer_config.json"):  # before anything loads: `_tokenize` reads the latter
        _refuse_custom_code(path, name)
    try:
        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
        cls = _model_class(transformers, path, getattr(config, "architectures", None))
        return cls.from_pretrained(str(path), local_files_only=True, trust_remote_code=False).eval()
    except (OSError, ValueError) as exc:  # a broken config.json or weights file
        raise CliError(f"--model {str(path)!r}: transformers could not load it ({_one_line(exc)})") from None


def _refuse_custom_code(path: Path, name: str) -> None:
    """Refuse a folder whose ``name`` (config.json, tokenizer_config.json) asks transformers for
    the folder's own Python code (``auto_map``) or names a model type it does not ship:
    transformers would offer to run that code, and an answer on stdin would run it."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    file = path / name
    if not file.exists():
        return  # transformers reports a missing config.json; a tokenizer file is optional
    config = _json_object(file, str(path))
    never = "tmcore never runs code from a model folder"
    if "auto_map" in config:
        raise CliError(f"--model {str(path)!r}: {name} maps classes to the folder's own code (auto_map); {never}")
    model_type = config.get("model_type")
    if (
        name == "config.json"
        and model_type is not None
        and not (isinstance(model_type, str) and model_type in CONFIG_MAPPING)
    ):
        raise CliError(
            f"--model {str(path)!r}: {name} model_type {model_type!r} is not one transformers "
            f"{transformers.__version__} knows, so loading it would need the folder's own code; {never}"
        )


def _model_class(transformers: Any, path: Path, architectures: Any) -> Any:
    """The transformers model class named first in the config's ``architectures``, or ``AutoModel``
    without one; any other name (a function such as ``pipeline``, a class of another library) is
    refused rather than called."""
    if not architectures:
        return transformers.AutoModel
    arch = architectures[0] if isinstance(architectures, (list, tuple)) else architectures
    try:
        cls = getattr(transformers, arch, None) if isinstance(arch, str) and arch.isidentifier() else None
    except (ImportError, RuntimeError):  # a lazy import of a class whose own dependencies are missing
        cls = None
    if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
        return cls
    raise CliError(
        f"--model {str(path)!r}: config.json architectures names {arch!r}, which is not a transformers model "
        f"class; allowed: a transformers model class such as BertForSequenceClassification, or none to use AutoModel"
    )


def _read_texts(path: str | None) -> list[str]:
    """Sentences, one per line, from ``--texts`` or the bundled sample."""
    if path is None:
        from importlib import resources

        text = resources.files("tmcore.models").joinpath("sentences.txt").read_text(encoding="utf-8")
    else:
        text = Path(path).read_text(encoding="utf-8")  # checked by `_sentences_file` while parsing
    texts = [line.strip() for line in text.splitlines() if line.strip()]
    if not texts:
        raise CliError(f"--texts {path!r}: no sentences in the file")
    return texts


def _tokenize(spec: str, texts: list[str], device: str) -> dict[str, Any]:
    """Token ids and a right-padded attention mask for ``texts``, with the model directory's tokenizer."""
    from transformers import AutoTokenizer

    path = spec.partition(":")[2] if spec.startswith("hf:") else spec
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise CliError(f"--model {spec!r}: a text model needs its tokenizer in the directory ({exc})") from None
    tokenizer.padding_side = "right"
    enc = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    return {k: v.to(device) for k, v in enc.items()}


def _inputs(args: argparse.Namespace, model: Any) -> tuple[Any, Any, Any]:
    """``(timed batch, all data for fidelity, labels or None)`` for ``--model``: the bundled
    images, sentences for text models (``--texts``), else random inputs of the model's shape."""
    from tmcore import models
    from tmcore.registry import registry

    if args.model in models.available():
        images, labels = models.load_samples(args.model)
        data = models.preprocess(images, model).to(args.device)
        return data[: args.batch_size], data, labels.to(args.device)
    adapter = registry.adapter_for(model)
    if adapter.describe(model).modality == "text":
        texts = _read_texts(getattr(args, "texts", None))
        batch = [texts[i % len(texts)] for i in range(args.batch_size)]
        return _tokenize(args.model, batch, args.device), _tokenize(args.model, texts, args.device), None
    inputs = {k: v.to(args.device) for k, v in adapter.example_inputs(model, args.batch_size, seed=0).items()}
    return inputs, inputs, None


def _progress(label: str) -> tuple[Callable[[int, int], None], Callable[[], None]]:
    """A progress bar (rich when installed) as ``(update(done, total), close())``."""
    try:
        from rich.progress import Progress
    except ImportError:

        def update(done: int, total: int) -> None:
            print(f"\r{label} {done}/{total}", end="", file=sys.stderr, flush=True)

        return update, lambda: print(file=sys.stderr)
    bar = Progress(transient=True)
    bar.start()
    task = bar.add_task(label, total=None)

    def update(done: int, total: int) -> None:
        bar.update(task, completed=done, total=total)

    return update, bar.stop


def _print_table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
        print(title)
        print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
        for r in rows:
            print("  ".join(v.rjust(w) for v, w in zip(r, widths)))
        return
    from rich.markup import escape

    # cells are plain text: a label such as "tome [compiled]" is not rich markup
    table = Table(title=escape(title), title_justify="left")
    for i, c in enumerate(columns):
        table.add_column(escape(c), justify="left" if i == 0 else "right")
    for r in rows:
        table.add_row(*map(escape, r))
    Console(width=max(160, Console().width)).print(table)


# -- commands ----------------------------------------------------------------------------------
def _status(plugin: Any) -> str:
    """``ok``, the load error, or for an adapter whose framework is not installed, ``inactive``."""
    import importlib.util

    import tmcore

    if plugin.error:
        return plugin.error
    missing = [
        lib
        for name in plugin.adapters
        if (lib := tmcore.adapters()[name].obj.library) and importlib.util.find_spec(lib) is None
    ]
    return f"inactive: {', '.join(missing)} not installed" if missing else "ok"


def _cmd_plugins(args: argparse.Namespace) -> int:
    import tmcore
    from tmcore.registry import registry

    infos = tmcore.plugins()
    skipped = registry.skipped  # installed, but TMCORE_PLUGINS / TMCORE_DISABLE_PLUGINS left them out
    if args.json:
        rows = [{**vars(p), "loaded": True, "status": _status(p)} for p in infos.values()]
        rows += [{"distribution": d, "loaded": False, "error": why} for d, why in sorted(skipped.items())]
        print(json.dumps(rows, indent=2))
        return 0
    if not infos and not skipped:
        print("no tmcore plugins installed (pip install tm-tome 'tmcore[timm]')")
        return 0
    rows = [
        [p.distribution, p.version, ", ".join(p.reducers) or "-", ", ".join(p.adapters) or "-", _status(p)]
        for p in infos.values()
    ]
    rows += [[d, "-", "-", "-", f"not loaded: {why}"] for d, why in sorted(skipped.items())]
    _print_table("installed tmcore plugins", ["distribution", "version", "reducers", "adapters", "status"], rows)
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    import torch

    import tmcore
    from tmcore import models
    from tmcore.bench import compare, compile_cache, compiled, fidelity, plot, reduction_share, variants, write_csv
    from tmcore.registry import registry

    if args.threads:
        torch.set_num_threads(args.threads)
    settings = _settings(args.reducer, args.load or ())
    dtype = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    model = load_model(args.model, args.pretrained, args.checkpoint).to(args.device)
    registry.find_adapter(model)  # no adapter: a clear error before any input is built
    inputs, data, labels = _inputs(args, model)
    patched = variants(model, settings)
    # with --compile, the eager variants and the compiled ones run in the same interleaved rounds
    timed = patched + (compiled(patched, args.compile) if args.compile else [])
    update, close = _progress("compiling and measuring" if args.compile else "measuring")
    rows = compare(
        timed,
        inputs,
        rounds=args.rounds,
        warmup=args.warmup,
        autocast_dtype=dtype,
        one_at_a_time=args.one_at_a_time,
        progress=update,
    )
    close()
    with compile_cache(len(timed)):  # compiled ones compile once more, for fidelity's batch size
        fids = fidelity([m for _, m in timed], data, labels, autocast_dtype=dtype)
    for row, fid in zip(rows, fids, strict=True):
        for key, value in fid.items():
            setattr(row, key, value)

    if args.model in models.available():
        weights = "bundled"
    elif hasattr(model, "tmcore_weights"):
        weights = model.tmcore_weights
    elif not args.model.startswith("timm:"):
        weights = "local weights"
    else:
        weights = "pretrained" if args.pretrained or args.checkpoint else "random-init"
    title = (
        f"{args.model} ({weights}), batch {args.batch_size}, {args.device}, {args.dtype}, "
        f"{torch.get_num_threads()} threads, median of {args.rounds} interleaved rounds"
        + (f"; eager, then torch.compile(mode={args.compile!r}) in the same rounds" if args.compile else "")
    )
    # agreement of argmax is a prediction metric: only for models with a head
    head = labels is None and _has_head(model, inputs)
    noise = rows[0].rel_error is not None  # a diffusion model's output: no prediction to agree on
    fid_cols = (
        ["top-1"]
        if labels is not None
        else (["agreement", "cosine"] if head else ["cosine", "rel. error"] if noise else ["cosine"])
    )
    unit = "sentences/s" if isinstance(inputs, dict) and "input_ids" in inputs else "images/s"
    table = []
    for row in rows:
        fid_vals = (
            [f"{100 * row.top1:.2f}%"]
            if labels is not None
            else ([f"{100 * row.agreement:.1f}%"] if head else [])
            + [f"{row.cosine:.4f}"]
            + ([f"{row.rel_error:.4f}"] if noise and not head else [])
        )
        single = (
            [f"{row.single_images_per_s:.1f}", f"{row.images_per_s / row.single_images_per_s:.2f}x"]
            if args.one_at_a_time
            else []
        )
        table.append(
            [
                row.label + (" [compiled]" if row.compiled else ""),
                f"{row.images_per_s:.{1 if row.images_per_s >= 10 else 3}f}",
                f"{row.speedup:.2f}x",
                f"{row.gmacs:.2f}",
                f"{row.flop_ratio:.2f}x",
                str(row.tokens_out),
                f"{row.peak_mem_mb:.0f}",
                *fid_vals,
                *single,
                *(
                    ([f"{row.compile_s:.1f}", str(row.graphs), str(row.recompiles)] if row.compiled else ["", "", ""])
                    if args.compile
                    else []
                ),
            ]
        )
    single_cols = [f"{unit} 1-by-1", "batch gain"] if args.one_at_a_time else []
    compile_cols = ["compile s", "graphs", "recompiles"] if args.compile else []
    _print_table(
        title,
        [
            "reducer",
            unit,
            "speed-up",
            "GMACs",
            "FLOP ratio",
            "tokens (finest block)" if noise else "tokens out",
            "peak MiB",
            *fid_cols,
            *single_cols,
            *compile_cols,
        ],
        table,
    )
    if args.show_counts:
        for row in rows[1 : len(patched)]:
            print(f"tokens per block, {row.label}: {' '.join(map(str, row.token_counts))}")
    if args.reduction_share:
        for s in settings:
            share = reduction_share(s.apply(model), inputs)
            print(f"share of forward time in tmcore's score/match/reduce, {s.label}: {100 * share:.1f}%")
        tmcore.remove(model)
    if args.json:
        with _writing("--json", args.json):
            Path(args.json).write_text(json.dumps([r.as_dict() for r in rows], indent=2, default=list))
    if args.csv:
        with _writing("--csv", args.csv):
            write_csv(rows, args.csv)
    if args.plot:
        with _writing("--plot", args.plot):
            plot(rows, args.plot, title)
        print(f"plot written to {args.plot}")
    return 0


def _one_setting(spec: str | None) -> Any:
    """The one validated `Setting` of ``--reducer SPEC`` (``None`` without one)."""
    if spec is None:
        return None
    settings = _settings([spec])
    if len(settings) != 1:
        raise CliError(f"--reducer {spec!r}: give one setting here (one value per key)")
    return settings[0]


def _cmd_eval(args: argparse.Namespace) -> int:
    from tmcore import models
    from tmcore.evaluate import bundled_dataset, image_folder, init_distributed, top1

    setting = _one_setting(args.reducer)
    rank, world, device = init_distributed(args.device)
    model = load_model(args.model, args.pretrained, args.checkpoint).to(device)
    if _modality(model) == "text":
        return _eval_text(args, model, setting, device)
    if setting:
        setting.apply(model)
    if args.data:
        data = image_folder(args.data, model)
    elif args.model in models.available():
        data = bundled_dataset(model, args.model)
    else:
        raise CliError(f"--data is required for {args.model!r} (only bundled models carry labelled images)")
    update, close = _progress("evaluating") if rank == 0 else (None, lambda: None)
    result = top1(model, data, batch_size=args.batch_size, device=device, workers=args.workers, progress=update)
    close()
    if rank == 0:
        what = f"{setting.reducer} {setting.config}" if setting else "unreduced"
        print(
            f"{args.model} ({what}): top-1 {100 * result['top1']:.2f}% ({result['correct']}/{result['total']}), "
            f"{world} process{'es' if world > 1 else ''}"
        )
        if args.json:
            reducer = [setting.reducer, setting.config] if setting else None
            summary = {**result, "model": args.model, "reducer": reducer, "world_size": world}
            with _writing("--json", args.json):
                Path(args.json).write_text(json.dumps(summary))
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0


def _modality(model: Any) -> str:
    from tmcore.registry import registry

    return registry.adapter_for(model).describe(model).modality


def _eval_text(args: argparse.Namespace, model: Any, setting: Any, device: str) -> int:
    """A text model has no labelled set here: how close the reduced model stays to the
    unreduced one on ``--texts`` (mean cosine of pooled embeddings, agreement of predictions
    where the model has a head) and how many tokens it keeps."""
    import copy

    import torch

    import tmcore
    from tmcore.bench import fidelity

    if setting is None:
        raise CliError("eval of a text model compares a reduced model with the unreduced one: pass --reducer SPEC")
    texts = _read_texts(args.texts)
    data = _tokenize(args.model, texts, device)
    reduced = setting.apply(copy.deepcopy(model))
    fid = fidelity([model, reduced], data, batch_size=args.batch_size)[1]
    with torch.inference_mode(), tmcore.trace(reduced) as t:
        reduced(**data)
    tokens_in = float(data["attention_mask"].sum(1).double().mean())
    tokens_out = float(torch.as_tensor(t.token_counts[-1]).double().mean())
    head = _has_head(model, data)
    agreement = f", agreement {100 * fid['agreement']:.1f}%" if head else ""
    print(
        f"{args.model} ({setting.reducer} {setting.config}) on {len(texts)} sentences: cosine to unreduced "
        f"{fid['cosine']:.4f}{agreement}, tokens {tokens_in:.1f} -> {tokens_out:.1f}"
    )
    if args.json:
        summary = {
            "model": args.model,
            "reducer": [setting.reducer, setting.config],
            "sentences": len(texts),
            "cosine": fid["cosine"],
            "agreement": fid["agreement"] if head else None,
            "tokens_in": tokens_in,
            "tokens_out": tokens_out,
        }
        with _writing("--json", args.json):
            Path(args.json).write_text(json.dumps(summary))
    return 0


def _has_head(model: Any, data: Any) -> bool:
    """Whether the model predicts (its output is or has logits) rather than only embedding."""
    import torch

    from tmcore.inputs import call, rows

    with torch.inference_mode():
        out = call(model, rows(data, 0, 1))
    return not isinstance(out, dict) or "logits" in out


def _cmd_visualize(args: argparse.Namespace) -> int:
    import torch

    import tmcore
    from tmcore import models
    from tmcore.evaluate import image_transform, read_image
    from tmcore.visualize import group_map, render_groups

    if not (args.model in models.available() or args.model.startswith("timm:")):
        raise CliError(
            f"--model {args.model!r}: visualize draws the patch grid of a timm ViT; allowed: a bundled model, timm:NAME"
        )
    image = read_image(args.image, "IMAGE")  # before the model loads: a bad file fails at once
    setting = _one_setting(args.reducer)
    model = load_model(args.model, args.pretrained, args.checkpoint).to(args.device)
    setting.apply(model)
    transform = image_transform(model)
    x = transform(image).unsqueeze(0).to(args.device)
    with torch.inference_mode(), tmcore.trace(model) as t:
        model(x)
    p = tmcore.get_patch(model).runtime.info.num_protected
    groups = group_map(t.source[0].cpu(), p, model.patch_embed.grid_size)
    scale = args.scale or max(1, 448 // max(model.patch_embed.grid_size))
    pixels = transform.crop(image.convert("RGB")) if args.style == "mean" else None
    with _writing("--out", args.out):
        render_groups(groups, scale, pixels).save(args.out)
    n_groups = int(groups.max()) + 1
    tokens_out = int(torch.as_tensor(t.token_counts[-1]).max())  # one image: ragged counts are [1]
    print(f"{args.out}: {n_groups} groups over {groups.numel()} patches ({tokens_out} tokens out incl. {p} protected)")
    return 0


def _cmd_new_plugin(args: argparse.Namespace) -> int:
    from tmcore.scaffold import new_plugin, registry_name

    name = registry_name(args.name)  # tm-my-method, as people pip install it, is my_method
    path = new_plugin(name, args.dir, adapter=args.adapter)
    kind = "adapter" if args.adapter else "reducer"
    print(
        f"wrote {path}/: the {kind} plugin {name!r} (distribution {path.name}). Next:\n"
        f"  pip install -e '{path}[test]'   # install it (editable) with its test dependencies\n"
        f"  pytest {path}                    # its tests, tmcore's conformance suite among them\n"
        f"  then replace the parts marked REPLACE; {path / 'README.md'} says how to publish it"
    )
    return 0


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="bundled model name, timm:NAME, hf:PATH (a local transformers directory), or diffusers:PATH (a local "
        "diffusers model or pipeline folder, or a shipped layout: sd15-unet, dit-xl-2-256) (default: %(default)s)",
    )
    p.add_argument("--pretrained", action="store_true", help="timm: download pretrained weights (needs the hub)")
    p.add_argument("--checkpoint", metavar="PATH", type=_input_file, help="timm: load weights from a local file")
    p.add_argument("--device", default="cpu", type=_device, help="cpu, cuda, cuda:N, mps, ... (default: %(default)s)")
    p.add_argument(
        "--texts",
        metavar="FILE",
        type=_sentences_file,
        help="text models: sentences, one per line (default: a bundled sample of 64 sentences)",
    )


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tmcore", description="Token reduction for transformers.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plugins", help="installed plugin distributions, what each registers, load errors")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_plugins)

    b = sub.add_parser("bench", help="reduced vs unreduced: throughput, FLOPs, tokens, memory, accuracy, side by side")
    _add_model_args(b)
    b.add_argument(
        "--reducer",
        action="append",
        metavar="SPEC",
        help="NAME[:KEY=V1,V2[;KEY=V]] (repeatable); default: every installed reducer's example settings",
    )
    b.add_argument(
        "--load",
        action="append",
        metavar="FILE",
        type=_input_file,
        help="a reducer file written by tmcore.save (config + learned state, e.g. LTMP thresholds); repeatable",
    )
    b.add_argument("--batch-size", type=_int_at_least(1), default=32)
    b.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="autocast dtype")
    b.add_argument(
        "--compile",
        nargs="?",
        const="default",
        choices=COMPILE_MODES,
        metavar="MODE",
        help="time every variant, the unreduced one included, under torch.compile(mode=MODE): "
        f"{', '.join(COMPILE_MODES)} (default when given bare); reports compile seconds, graphs and recompiles",
    )
    b.add_argument(
        "--threads", type=_int_at_least(0, "0: torch's default"), default=0, help="torch CPU threads (default: torch's)"
    )
    b.add_argument("--rounds", type=_int_at_least(1), default=10, help="timed interleaved rounds (median)")
    b.add_argument("--warmup", type=_int_at_least(0), default=2, help="untimed rounds first (default: %(default)s)")
    b.add_argument(
        "--one-at-a-time",
        action="store_true",
        help="also time the same images fed one by one (batch size 1) and report the batching gain",
    )
    b.add_argument("--show-counts", action="store_true", help="print tokens per block for each setting")
    b.add_argument("--reduction-share", action="store_true", help="time share of the score/match/reduce step")
    b.add_argument("--json", metavar="PATH", type=_output_file, help="write the rows as JSON")
    b.add_argument("--csv", metavar="PATH", type=_output_file, help="write the rows as CSV")
    b.add_argument(
        "--plot",
        metavar="PNG",
        type=_plot_file,
        help="accuracy (or agreement) against throughput (.png, .pdf, .svg...)",
    )
    b.set_defaults(func=_cmd_bench)

    e = sub.add_parser(
        "eval",
        help="top-1 on a labelled image folder or the bundled images (torchrun-aware); for a text model, "
        "cosine and agreement with the unreduced model on --texts",
    )
    _add_model_args(e)
    e.add_argument(
        "--data",
        metavar="DIR",
        type=_image_folder,
        help="ImageFolder root (DIR/<class>/<image>); default: bundled images",
    )
    e.add_argument("--reducer", metavar="SPEC", help="apply one reducer setting, e.g. tome:r=13")
    e.add_argument("--batch-size", type=_int_at_least(1), default=64)
    e.add_argument(
        "--workers", type=_int_at_least(0, "0: load in the main process"), default=0, help="DataLoader workers"
    )
    e.add_argument("--json", metavar="PATH", type=_output_file, help="write the result as JSON (rank 0)")
    e.set_defaults(func=_cmd_eval)

    v = sub.add_parser("visualize", help="PNG of the merged groups over the input: one colour per output token")
    v.add_argument("image", metavar="IMAGE", type=_input_file)
    _add_model_args(v)
    v.add_argument("--reducer", default="tome:r=13", metavar="SPEC", help="one setting (default: %(default)s)")
    v.add_argument("--out", default="groups.png", type=_image_file, help="output PNG (default: %(default)s)")
    v.add_argument(
        "--scale",
        type=_int_at_least(0, "0: about 448 px wide"),
        default=0,
        help="pixels per patch (default: about 448 px wide)",
    )
    v.add_argument(
        "--style",
        default="flat",
        choices=["flat", "mean"],
        help="flat: one distinct colour per group; mean: each group in its mean input colour, "
        "outlined (the ToMe paper's figures) (default: %(default)s)",
    )
    v.set_defaults(func=_cmd_visualize)

    n = sub.add_parser(
        "new-plugin",
        help="write a new reducer (or --adapter) plugin distribution that passes tmcore's conformance suite",
    )
    n.add_argument(
        "name",
        metavar="NAME",
        help="its registry name, a lowercase identifier (e.g. my_method), or its distribution name (tm-my-method)",
    )
    n.add_argument("--adapter", action="store_true", help="an adapter for a backbone family instead of a reducer")
    n.add_argument("--dir", default=".", metavar="DIR", help="where its folder (tm-my-method/) goes (default: .)")
    n.set_defaults(func=_cmd_new_plugin)
    return parser


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line, checked; unknown arguments are reported for the subcommand they follow
    (argparse reports them for the bare ``tmcore``)."""
    args, unknown = _parser().parse_known_args(argv)
    if unknown:
        raise _UsageError(f"tmcore {args.command}", f"unrecognized arguments: {' '.join(unknown)}")
    return args


def _fail(prog: str, exc: Exception) -> int:
    """One line on stderr, however the message was written, and the usage-error status."""
    message = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parse(argv)
    except _UsageError as exc:
        return _fail(exc.prog, exc)
    try:
        return args.func(args)
    except TmcoreError as exc:
        return _fail(f"tmcore {args.command}", exc)


if __name__ == "__main__":
    sys.exit(main())
