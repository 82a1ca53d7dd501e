"""Command line: ``python -m skdebias demo`` and ``python -m skdebias audit``."""

from __future__ import annotations

import argparse
import sys

import numpy as np

from .report import Timer, format_table, write_json

__all__ = ["main", "run_demo", "run_audit"]


def _accuracy(net, X, y):
    return float(np.mean(net.predict(X) == y))


def run_demo(seed=0, epochs=8, artifact="patch", target_class=0, p=0.3, layer="features.6",
             correction=True, verbose=True):
    """Train a Clever-Hans CNN on artifact digits, audit it with CAVs, and (optionally) correct it.

    Returns a dict with the audit rows, the correction rows and timings.
    """
    import torch

    from .concepts import CAVEstimator, cav_alignment
    from .datasets import make_artifact_digits
    from .extraction import ActivationExtractor
    from .models import SmallCNN, make_classifier

    say = print if verbose else (lambda *a, **k: None)
    timer = Timer()
    data = make_artifact_digits(target_class=target_class, p=p, artifact=artifact, random_state=seed)
    X_att = data.add_artifact(data.X_test)
    n_art = int(data.concept.sum())
    say(f"Artifact digits: {len(data.y)} train images, artifact '{artifact}' in {n_art} images of "
        f"class {target_class} (p={p}); {len(data.y_test)} clean test images. Seed {seed}.")

    with timer("train"):
        net = make_classifier(SmallCNN, max_epochs=epochs, lr=2e-3, random_state=seed)
        net.fit(data.X, data.y)
    clean, attacked = _accuracy(net, data.X_test, data.y_test), _accuracy(net, X_att, data.y_test)

    with timer("extract"):
        extractor = ActivationExtractor(net, layer=layer).fit(data.X)
        A = extractor.transform(data.X)
        A_test, A_test_att = extractor.transform(data.X_test), extractor.transform(X_att)
    # CAVs are fitted within the target class: artifact vs clean images of the same digit, so the
    # direction separates the artifact and not the digit class.
    in_class = data.y == target_class
    cav_rows = []
    cavs = {}
    for method in ("pattern", "svm"):
        name = f"fit_{method}"
        with timer(name):
            est = CAVEstimator(method=method, random_state=seed).fit(A[in_class],
                                                                    data.concept[in_class])
        cavs[method] = est
        align = cav_alignment(est.cav_, A_test_att, A_test)
        cav_rows.append({"cav": method, "cos(mean d, cav)": align["cos_mean_diff"],
                         "mean cos(d, cav)": align["mean_cos"],
                         "fit ms": 1000 * timer[name]})
    summary = [
        {"quantity": "clean test accuracy", "value": f"{clean:.3f}"},
        {"quantity": "attacked test accuracy (artifact in every image)", "value": f"{attacked:.3f}"},
        {"quantity": "accuracy lost to the artifact (points)", "value": f"{100 * (clean - attacked):.1f}"},
        {"quantity": f"training ({epochs} epochs, {net.device})", "value": f"{timer['train']:.1f} s"},
        {"quantity": f"activation extraction at {layer!r}", "value": f"{timer['extract']:.2f} s"},
    ]
    say("")
    say(format_table(summary, title="Audit of the trained network"))
    say("")
    say(format_table(cav_rows, title="CAV alignment with the true artifact direction "
                                     f"(CAVs fitted on class {target_class}; "
                                     "d = a(x + artifact) - a(x) on test images)"))
    result = {"seed": seed, "epochs": epochs, "artifact": artifact, "target_class": target_class,
              "p": p, "layer": layer, "clean_accuracy": clean, "attacked_accuracy": attacked,
              "cav": cav_rows, "timings_s": dict(timer.seconds)}

    if correction:
        try:
            from .correction import compare_corrections
        except ImportError:  # correction module not available in this build
            compare_corrections = None
        if compare_corrections is not None:
            with timer("correction"):
                rows = compare_corrections(net, data, layer=layer, cav=cavs["pattern"],
                                           random_state=seed)
            say("")
            say(format_table(rows, title="Correction on artifact digits "
                                         "(concept sensitivity: mean |grad . cav| at the layer)"))
            result["correction"] = rows
            result["timings_s"] = dict(timer.seconds)
    say("")
    say(f"Total time: {sum(timer.seconds.values()):.1f} s (torch threads: {torch.get_num_threads()})")
    return result


def _first_in_channels(module):
    """``in_channels`` of the network's first convolution (``None`` without one)."""
    for m in module.modules():
        if isinstance(getattr(m, "in_channels", None), int):
            return m.in_channels
    return None


def run_audit(model, images, concept, layer, image_size=None, batch_size=64, device="auto",
              grayscale=None, verbose=True):
    """Audit a saved model for a concept given as example images.

    ``model`` is a file written by ``torch.save(module)``; ``images`` an
    ImageFolder-style directory with the classes; ``concept`` a directory with
    two sub-folders whose second (sorted) name holds images *with* the concept.
    ``grayscale=None`` loads one channel when the network's first convolution
    takes one. The two directories may hold images of different sizes when the
    network accepts them (e.g. global pooling before its head).
    """
    import torch

    from ._torch import predict_proba, resolve_device
    from .concepts import CAVEstimator
    from .datasets import load_image_folder
    from .extraction import ActivationExtractor

    say = print if verbose else (lambda *a, **k: None)
    module = torch.load(model, weights_only=False, map_location="cpu")
    if not isinstance(module, torch.nn.Module):
        raise ValueError(f"{model!r} does not hold a torch.nn.Module (saved with torch.save(module)).")
    module.to(resolve_device(device))  # the loaded copy is ours to move
    if grayscale is None:
        grayscale = _first_in_channels(module) == 1
    data = load_image_folder(images, image_size=image_size, grayscale=grayscale)
    conc = load_image_folder(concept, image_size=image_size, grayscale=grayscale)
    if len(conc.target_names) != 2:
        raise ValueError(f"{concept!r} must hold exactly two sub-folders (without / with the "
                         f"concept), found {list(conc.target_names)}.")

    def activations(X):
        ext = ActivationExtractor(module, layer=layer, batch_size=batch_size, device=device)
        return ext.fit_transform(X)

    A_concept = activations(conc.X)
    cav = CAVEstimator().fit(A_concept, conc.y)
    preds = predict_proba(module, data.X, batch_size=batch_size).argmax(axis=1)
    proj = cav.transform(activations(data.X))[:, 0]
    rows = []
    for k, name in enumerate(data.target_names):
        m = data.y == k
        rows.append({"class": name, "n": int(m.sum()), "accuracy": float(np.mean(preds[m] == k)),
                     "mean concept score": float(proj[m].mean())})
    cav_accuracy = cav.score(A_concept, conc.y)
    say(format_table(rows, title=f"Concept '{conc.target_names[1]}' at layer {layer!r}: "
                                 f"CAV accuracy on the concept set {cav_accuracy:.3f}"))
    return {"rows": rows, "cav": cav.cav_}


def main(argv=None):
    """Entry point of ``python -m skdebias``."""
    parser = argparse.ArgumentParser(prog="skdebias", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a Clever-Hans CNN on built-in data, audit and correct it")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--epochs", type=int, default=8)
    demo.add_argument("--artifact", default="patch", choices=["patch", "timestamp", "lsb", "brightness"])
    demo.add_argument("--no-correction", action="store_true", help="only audit, do not correct")
    demo.add_argument("--json", help="also write the results to this JSON file")
    audit = sub.add_parser("audit", help="measure a saved model's use of a concept")
    audit.add_argument("--model", required=True, help="file saved with torch.save(module)")
    audit.add_argument("--images", required=True, help="ImageFolder-style directory of labelled images")
    audit.add_argument("--concept", required=True,
                       help="directory with two sub-folders; the second in sorted order (e.g. "
                            "'absent', 'present') holds the images with the concept")
    audit.add_argument("--layer", required=True)
    audit.add_argument("--image-size", type=int, default=None)
    audit.add_argument("--device", default="auto")
    audit.add_argument("--grayscale", action=argparse.BooleanOptionalAction, default=None,
                       help="load one channel (default: when the first convolution takes one)")
    audit.add_argument("--json")
    args = parser.parse_args(argv)
    if args.command == "demo":
        result = run_demo(seed=args.seed, epochs=args.epochs, artifact=args.artifact,
                          correction=not args.no_correction)
    else:
        try:
            result = run_audit(args.model, args.images, args.concept, args.layer,
                               image_size=args.image_size, device=args.device,
                               grayscale=args.grayscale)
        except (ValueError, FileNotFoundError) as exc:  # bad paths, folders, layer names
            parser.exit(2, f"skdebias audit: error: {exc}\n")
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
