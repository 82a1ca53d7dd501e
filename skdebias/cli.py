"""Command line: ``python -m skdebias demo`` and ``python -m skdebias audit``."""

from __future__ import annotations

import argparse
import importlib
import os
import pickle
import pickletools
import sys
import warnings
import zipfile
from collections.abc import Mapping

import numpy as np

from ._demo import run_demo
from .report import format_table, write_json

__all__ = ["main", "run_demo", "run_audit"]


def _first_in_channels(module):
    """``in_channels`` of the network's first convolution (``None`` without one)."""
    for m in module.modules():
        if isinstance(getattr(m, "in_channels", None), int):
            return m.in_channels
    return None


def _is_state_dict(obj):
    """Whether ``obj`` is a non-empty mapping of parameter names to tensors."""
    import torch

    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _holds_pickled_objects(path, exc):
    """Whether a file that failed the tensors-only load is a readable pickle of Python objects.

    Such a file (a whole network saved with ``torch.save(module)``) needs ``--trust-model``;
    anything else failed because it is damaged or not a torch file.
    """
    if "Unsupported global" in str(exc):
        return True
    # torch's message may change between versions; the archive itself tells the same thing:
    # a zip archive written by torch.save whose pickle parses to the end.
    try:
        with zipfile.ZipFile(path) as archive:
            name = next(n for n in archive.namelist() if n.endswith("/data.pkl"))
            for _ in pickletools.genops(archive.read(name)):
                pass
    except Exception:
        return False
    return True


def _num_classes(state_dict):
    """Rows of the last 2-D ``*.weight`` tensor, or ``None`` without one.

    A state dict lists tensors in the order the modules were registered, so that
    tensor is the weight of the last ``Linear`` layer, the head of a classifier.
    """
    weights = [v for k, v in state_dict.items() if k.endswith(".weight") and v.ndim == 2]
    return int(weights[-1].shape[0]) if weights else None


def _one_line(exc):
    """``"Type: message"`` on one line, cut to 200 characters, for the one-line CLI errors."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


def _build_arch(arch, state_dict):
    """The untrained network named by ``--arch``, ready for ``state_dict``."""
    import torch

    if ":" in arch:
        module_name, _, attr = arch.partition(":")
        try:
            obj = importlib.import_module(module_name)
        except Exception as exc:
            raise ValueError(f"--arch {arch!r}: cannot import module {module_name!r} "
                             f"({_one_line(exc)}).") from None
        try:
            for part in attr.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"--arch {arch!r}: module {module_name!r} has no attribute "
                             f"{attr!r}.") from None
        try:
            net = obj()
        except Exception as exc:
            raise ValueError(f"--arch {arch!r}: {attr}() with no arguments failed "
                             f"({_one_line(exc)}); --arch takes a class that builds the "
                             f"network without arguments.") from None
        if not isinstance(net, torch.nn.Module):
            raise ValueError(f"--arch {arch!r}: {attr}() returned an object of type "
                             f"{type(net).__name__}, not a torch.nn.Module.")
        return net

    import difflib

    import torchvision

    available = torchvision.models.list_models(module=torchvision.models)
    if arch not in available:
        close = difflib.get_close_matches(arch, available, n=5)
        raise ValueError(f"--arch {arch!r} is neither a torchvision classification model "
                         f"(closest: {close}) nor of the form 'package.module:Class'.")
    kwargs = {}
    n_out = _num_classes(state_dict)
    if n_out is not None:
        kwargs["num_classes"] = n_out
    try:
        return torchvision.models.get_model(arch, weights=None, **kwargs)
    except Exception as exc:
        raise ValueError(f"--arch {arch!r}: torchvision could not build it with {kwargs} "
                         f"({_one_line(exc)}).") from None


def _load_weights(module, state_dict, path, arch):
    """Copy ``state_dict`` into ``module``, refusing any missing, unexpected or reshaped tensor."""
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    reshaped = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}"
                for k, v in own.items() if k in state_dict and state_dict[k].shape != v.shape]

    def some(keys):
        more = f" and {len(keys) - 5} more" if len(keys) > 5 else ""
        return ", ".join(keys[:5]) + more

    problems = [f"{label}: {some(keys)}" for label, keys in
                (("missing keys", missing), ("unexpected keys", unexpected),
                 ("shapes in the file vs the architecture", reshaped)) if keys]
    if problems:
        raise ValueError(f"--model {path!r} does not match --arch {arch!r}: "
                         + "; ".join(problems) + ".")
    try:
        module.load_state_dict(state_dict, strict=True)
    except Exception as exc:  # e.g. a dtype that cannot be copied
        raise ValueError(f"--model {path!r} does not load into --arch {arch!r} "
                         f"({_one_line(exc)}).") from None
    return module


def _load_model(path, arch=None, trust_model=False):
    """Load the network of a model file without running code from it, unless trusted.

    Parameters
    ----------
    path : str or path-like
        A state dict saved with ``torch.save(module.state_dict())`` (needs
        ``arch``), or a whole network saved with ``torch.save(module)`` (needs
        ``trust_model=True``).
    arch : str or None, default=None
        Architecture of a state dict: a torchvision classification model name
        (e.g. ``"resnet18"``; built with random weights and as many classes as
        the state dict's last ``Linear`` weight has rows) or
        ``"package.module:Class"`` (imported and called without arguments).
    trust_model : bool, default=False
        Allow unpickling a whole network. Unpickling runs any code the file
        holds, so only do it for files you made or trust. Without it the file
        is read with ``torch.load(weights_only=True)``: tensors and plain
        containers only.

    Returns
    -------
    torch.nn.Module
        The network on the CPU.

    Raises
    ------
    ValueError
        For every problem with the file (missing, empty, corrupt, a whole
        network without ``trust_model``, a state dict without ``arch`` or one
        that does not fit it) or with ``arch``; the message is one line that
        names the file or the architecture.
    """
    import torch

    path = os.fspath(path)
    if not os.path.exists(path):
        raise ValueError(f"--model {path!r}: no such file.")
    if os.path.isdir(path):
        raise ValueError(f"--model {path!r} is a directory; expected a file written by torch.save.")
    if os.path.getsize(path) == 0:
        raise ValueError(f"--model {path!r} is empty (0 bytes); expected a file written by "
                         "torch.save.")
    try:
        # torch warns about pickle protocols of damaged files; the error below says it all
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(path, weights_only=True, map_location="cpu")
    except OSError as exc:
        raise ValueError(f"--model {path!r} cannot be read ({exc.strerror or exc}).") from None
    except Exception as exc:
        if trust_model:
            # consented to: the full unpickler also reads what the tensors-only one rejects
            try:
                obj = torch.load(path, weights_only=False, map_location="cpu")
            except Exception as exc2:
                raise ValueError(f"--model {path!r} cannot be loaded by torch.load (corrupt, "
                                 "truncated or of another format: "
                                 f"{_one_line(exc2)}).") from None
        elif isinstance(exc, pickle.UnpicklingError) and _holds_pickled_objects(path, exc):
            raise ValueError(
                f"--model {path!r} holds a whole pickled network, and unpickling it would run "
                "code from the file: pass a state dict (torch.save(model.state_dict())) with "
                "--arch, or pass --trust-model if you trust the file.") from None
        else:
            raise ValueError(f"--model {path!r} is not a file written by torch.save (corrupt, "
                             "truncated or of another format).") from None

    if isinstance(obj, torch.nn.Module):
        if arch is not None:
            raise ValueError(f"--model {path!r} holds a whole network ({type(obj).__name__}), "
                             f"so --arch {arch!r} does not apply; leave --arch out.")
        return obj
    if not _is_state_dict(obj):
        hint = ""
        if isinstance(obj, Mapping):
            inner = [k for k, v in obj.items() if _is_state_dict(v)]
            if inner:
                hint = f"; it holds a state dict under the key {inner[0]!r}: save that one alone"
        raise ValueError(f"--model {path!r} holds a {type(obj).__name__}, neither a state dict "
                         f"(parameter names to tensors) nor a torch.nn.Module{hint}.")
    if arch is None:
        raise ValueError(f"--model {path!r} holds a state dict (tensors only): name its "
                         "architecture with --arch, a torchvision model name (e.g. 'resnet18') "
                         "or 'package.module:Class'.")
    return _load_weights(_build_arch(arch, obj), obj, path, arch)


def run_audit(model, images, concept, layer, image_size=None, batch_size=64, device="auto",
              grayscale=None, verbose=True, arch=None, trust_model=False, progress=False,
              report=None, figures=None):
    """Audit a saved model for a concept given as example images.

    Parameters
    ----------
    model : str or path-like
        A state dict written by ``torch.save(module.state_dict())`` (give
        ``arch``) or a whole network written by ``torch.save(module)`` (give
        ``trust_model=True``).
    images : str
        ImageFolder-style directory with one sub-folder per class.
    concept : str
        Directory with two sub-folders; the second in sorted order holds the
        images *with* the concept.
    layer : str
        Name of the layer whose activations the CAV is fitted on.
    image_size : int or None, default=None
        Resize the images to this size (``None``: keep them).
    batch_size : int, default=64
    device : str, default="auto"
    grayscale : bool or None, default=None
        ``None`` loads one channel when the network's first convolution takes
        one. The two directories may hold images of different sizes when the
        network accepts them (e.g. global pooling before its head).
    verbose : bool, default=True
        Print the table.
    arch : str or None, default=None
        Architecture of a state dict: a torchvision model name (random weights,
        as many classes as the state dict's last ``Linear`` weight has rows) or
        ``"package.module:Class"`` (called without arguments).
    trust_model : bool, default=False
        Allow unpickling a whole network, which runs any code the file holds.
    progress : bool, default=False
        Progress bars over the long steps.
    report : str or path-like, optional
        Also write the HTML audit report here (needs jinja2:
        ``pip install skdebias[report]``).
    figures : str or path-like, optional
        Also write the report's figures as PNG files into this folder.

    Returns
    -------
    dict
        ``rows`` (per class: ``n``, ``accuracy``, ``mean concept score``),
        ``cav`` (the unit CAV), and the paths written (``report``,
        ``figures``).

    Raises
    ------
    ValueError
        For a model file or ``arch`` that cannot be used (one-line message
        naming it), a concept folder without two sub-folders, an unknown layer.
    """
    from ._utils._modules import predict_proba
    from ._utils._runtime import resolve_device
    from .concepts import CAVEstimator
    from .datasets import load_image_folder
    from .extraction import ActivationExtractor

    if report is not None:  # fail before the work when jinja2 is missing
        from .report import jinja_environment

        jinja_environment()
    say = print if verbose else (lambda *a, **k: None)
    module = _load_model(model, arch=arch, trust_model=trust_model)
    module.to(resolve_device(device))  # the loaded copy is ours to move
    if grayscale is None:
        grayscale = _first_in_channels(module) == 1
    data = load_image_folder(images, image_size=image_size, grayscale=grayscale)
    conc = load_image_folder(concept, image_size=image_size, grayscale=grayscale)
    if len(conc.target_names) != 2:
        raise ValueError(f"{concept!r} must hold exactly two sub-folders (without / with the "
                         f"concept), found {list(conc.target_names)}.")

    def activations(X):
        ext = ActivationExtractor(module, layer=layer, batch_size=batch_size, device=device,
                                  verbose=int(progress))
        return ext.fit_transform(X)

    A_concept = activations(conc.X)
    cav = CAVEstimator().fit(A_concept, conc.y)
    preds = predict_proba(module, data.X, batch_size=batch_size).argmax(axis=1)
    A = activations(data.X)
    proj = cav.transform(A)[:, 0]
    rows = []
    for k, name in enumerate(data.target_names):
        m = data.y == k
        rows.append({"class": name, "n": int(m.sum()), "accuracy": float(np.mean(preds[m] == k)),
                     "mean concept score": float(proj[m].mean())})
    cav_accuracy = cav.score(A_concept, conc.y)
    say(format_table(rows, title=f"Concept '{conc.target_names[1]}' at layer {layer!r}: "
                                 f"CAV accuracy on the concept set {cav_accuracy:.3f}"))
    result = {"rows": rows, "cav": cav.cav_}
    if report is not None or figures is not None:
        audit = _audit_report(module, data, conc, layer, cav, A, preds, proj, cav_accuracy,
                              batch_size, device, progress)
        if report is not None:
            result["report"] = str(audit.save(report))
            say(f"Report written to {result['report']}")
        if figures is not None:
            result["figures"] = audit.save_figures(figures)
            say(f"Figures written to {figures} ({len(result['figures'])} PNG files)")
    return result


def _audit_report(module, data, conc, layer, cav, A, preds, proj, cav_accuracy, batch_size,
                  device, progress, max_classes=4, min_spray=8):
    """The :class:`~skdebias.report.AuditReport` of ``skdebias audit``: SpRAy on the classes with
    at least ``min_spray`` images, spuriosity along the CAV, TCAV against the concept-free
    images, the concept sensitivity at the layer, and heatmaps of the images that show the
    concept most."""
    from .attribution import attribute
    from .concepts import tcav_score
    from .detection import SpectralRelevanceAnalysis
    from .metrics import concept_sensitivity
    from .ranking import SpuriosityRanker
    from .report import AuditReport

    notes = {}
    classes, counts = np.unique(data.y, return_counts=True)
    big = classes[counts >= min_spray][:max_classes].tolist()
    spray = None
    if big:
        spray = SpectralRelevanceAnalysis(module, classes=big, max_clusters=4,
                                          batch_size=batch_size, device=device, random_state=0,
                                          verbose=int(progress)).fit(data.X, data.y)
    else:
        notes["strategies"] = (f"SpRAy needs at least {min_spray} images of a class; the "
                               f"largest class has {int(counts.max())}.")
    spuriosity = None
    if counts.min() >= 2:
        spuriosity = SpuriosityRanker(cav=cav).fit(A, data.y).score_samples(A, data.y)
    else:
        notes["spuriosity"] = "Spuriosity needs at least 2 images in every class."
    tcav, tcav_note = None, ""
    negatives = conc.X[conc.y == 0]
    if len(negatives) >= 3:
        try:  # pattern CAVs: the CAV method of the audit (a logistic one can be all zero)
            tcav = tcav_score(module, data.X, layer, conc.X[conc.y == 1], negatives,
                              n_random=5, cav_method="pattern", batch_size=batch_size,
                              random_state=0)
        except ValueError as exc:
            tcav_note = f" TCAV was not computed: {exc}"
    else:
        tcav_note = " TCAV was not computed: it needs at least 3 images without the concept."
    sens = {layer: concept_sensitivity(module, data.X, layer, cav,
                                       batch_size=batch_size)["mean_abs"]}
    top = np.argsort(-proj, kind="stable")[:6]
    R = attribute(module, data.X[top], batch_size=batch_size, device=device,
                  verbose=int(progress))
    titles = [f"{data.target_names[data.y[i]]} -> {data.target_names[preds[i]]}"
              if preds[i] < len(data.target_names) else f"{data.target_names[data.y[i]]}"
              for i in top]
    concept_name = conc.target_names[1]
    description = (f"Concept '{concept_name}' at layer {layer!r}: CAV accuracy on the concept "
                   f"images {cav_accuracy:.3f}. The heatmaps show the {len(top)} images whose "
                   "activation lies furthest along the concept direction." + tcav_note)
    return AuditReport(module, data.X, data.y, y_pred=preds, class_names=list(data.target_names),
                       title=f"skdebias audit: concept '{concept_name}'", description=description,
                       spray=spray, spuriosity=spuriosity, cav={concept_name: cav.cav_},
                       tcav={concept_name: tcav} if tcav is not None else None,
                       sensitivity=sens, heatmaps={"X": data.X[top], "relevance": R,
                                                   "titles": titles},
                       notes=notes or None, max_classes=max_classes, n_images=4)


_EXIT_CODES = """\
output:
  --output DIR writes DIR/report.html (the HTML audit report), DIR/results.json and
  DIR/figures/*.png; --report FILE.html and --json FILE write one of them. The demo writes
  demo_output/ unless one of them or --no-report is given.

exit status:
  0  success
  1  an unexpected error (a Python traceback follows)
  2  a usage error, or an input that cannot be used (a model file that is missing, empty,
     corrupt, of the wrong kind or does not fit --arch; an image folder; a layer name; an
     output path that cannot be written; --report without jinja2 installed);
     the reason is one line on stderr: 'skdebias <command>: error: <message>'
"""

#: Output folder of ``skdebias demo`` when no output is named.
DEMO_OUTPUT = "demo_output"


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _common_options():
    """Options shared by ``demo`` and ``audit`` (an argparse parent parser)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--batch-size", type=_positive_int, default=64,
                        help="images per forward/backward pass (default: 64)")
    common.add_argument("--device", default="auto",
                        help="'auto' (CUDA when available, else CPU), 'cpu', 'cuda', 'cuda:1', ...")
    common.add_argument("--output", metavar="DIR",
                        help="write report.html, results.json and figures/*.png into DIR")
    common.add_argument("--report", metavar="FILE.html",
                        help="write the HTML audit report to this file (needs jinja2: "
                             "pip install skdebias[report])")
    common.add_argument("--json", metavar="FILE", help="also write the results to this JSON file")
    common.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bars on the long steps (default: when stderr is a "
                             "terminal)")
    return common


def _outputs(args, default_output=None):
    """``(report, json, figures)`` paths from ``--report``, ``--json`` and ``--output``."""
    output = args.output
    if output is None and default_output is not None and not (args.report or args.json):
        output = default_output
    report, json_path, figures = args.report, args.json, None
    if output is not None:
        report = report or os.path.join(output, "report.html")
        json_path = json_path or os.path.join(output, "results.json")
        figures = os.path.join(output, "figures")
    return report, json_path, figures


def main(argv=None):
    """Entry point of ``python -m skdebias``.

    Parameters
    ----------
    argv : list of str or None, default=None
        Arguments without the program name (``None``: ``sys.argv[1:]``).

    Returns
    -------
    int
        0 on success. Usage errors and unusable inputs exit with status 2 and
        one line on stderr (``SystemExit``).
    """
    from importlib.metadata import version

    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="skdebias", description=__doc__, epilog=_EXIT_CODES,
                                     formatter_class=raw)
    parser.add_argument("--version", action="version", version=f"skdebias {version('skdebias')}")
    sub = parser.add_subparsers(dest="command", required=True)
    common = _common_options()
    demo = sub.add_parser("demo", epilog=_EXIT_CODES, formatter_class=raw, parents=[common],
                          help="train a Clever-Hans CNN on built-in data, audit and correct it")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--epochs", type=_positive_int, default=8)
    demo.add_argument("--artifact", default="patch", choices=["patch", "timestamp", "lsb", "brightness"])
    demo.add_argument("--no-correction", action="store_true", help="only audit, do not correct")
    demo.add_argument("--no-report", action="store_true",
                      help=f"do not write {DEMO_OUTPUT}/ when no --output, --report or --json "
                           "is given")
    audit = sub.add_parser("audit", help="measure a saved model's use of a concept",
                           epilog=_EXIT_CODES, formatter_class=raw, parents=[common])
    audit.add_argument("--model", required=True,
                       help="a state dict saved with torch.save(model.state_dict()) (give --arch), "
                            "or a whole network saved with torch.save(model) (give --trust-model)")
    audit.add_argument("--arch", default=None,
                       help="architecture of a state dict: a torchvision model name (e.g. "
                            "resnet18; its number of classes is read from the state dict's "
                            "last Linear layer) or package.module:Class (built without "
                            "arguments)")
    audit.add_argument("--trust-model", action="store_true",
                       help="allow a whole pickled network in --model. Unpickling runs any code "
                            "the file contains: use it only for files you made or trust. "
                            "Without it the file is read as tensors only")
    audit.add_argument("--images", required=True, help="ImageFolder-style directory of labelled images")
    audit.add_argument("--concept", required=True,
                       help="directory with two sub-folders; the second in sorted order (e.g. "
                            "'absent', 'present') holds the images with the concept")
    audit.add_argument("--layer", required=True)
    audit.add_argument("--image-size", type=int, default=None)
    audit.add_argument("--grayscale", action=argparse.BooleanOptionalAction, default=None,
                       help="load one channel (default: when the first convolution takes one)")
    args = parser.parse_args(argv)

    def fail(message):
        # one line, whatever the message: scripts read the reason from stderr
        parser.exit(2, f"skdebias {args.command}: error: {' '.join(str(message).split())}\n")

    default_output = DEMO_OUTPUT if args.command == "demo" and not args.no_report else None
    report, json_path, figures = _outputs(args, default_output)
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    if report is not None:
        from .report import jinja_environment

        try:
            jinja_environment()
        except ImportError as exc:
            if args.report or args.output:
                fail(f"--report/--output: {exc}")
            print(f"skdebias demo: no HTML report ({exc})", file=sys.stderr)
            report = None
    for path in (report, json_path, figures):  # before the work, not after it
        folder = os.path.dirname(os.path.abspath(path)) if path else None
        if folder and os.path.exists(folder) and not os.path.isdir(folder):
            fail(f"{path!r} cannot be written: {folder!r} is not a directory.")
    kw = dict(batch_size=args.batch_size, device=args.device, progress=progress,
              report=report, figures=figures)
    try:
        if args.command == "demo":
            result = run_demo(seed=args.seed, epochs=args.epochs, artifact=args.artifact,
                              correction=not args.no_correction, **kw)
        else:
            try:
                result = run_audit(args.model, args.images, args.concept, args.layer,
                                   image_size=args.image_size, grayscale=args.grayscale,
                                   arch=args.arch, trust_model=args.trust_model, **kw)
            except (ValueError, FileNotFoundError) as exc:  # model file, folders, layer names
                fail(exc)
    except OSError as exc:  # the report or the figures
        if exc.filename is None:
            raise
        fail(f"{exc.filename!r} cannot be written ({exc.strerror or exc}).")
    if json_path:
        try:
            write_json(json_path, result)
        except OSError as exc:
            fail(f"--json {json_path!r} cannot be written ({exc.strerror or exc}).")
        print(f"Results written to {json_path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
