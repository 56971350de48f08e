"""Small block diagrams (Graphviz DOT text) of how each family of methods works, for the Learn page."""

from __future__ import annotations

_STYLE = ('graph [rankdir=LR, bgcolor="transparent", fontsize=11]; '
          'node [shape=box, style="rounded,filled", fillcolor="#eef3fb", color="#6b8cc7", fontsize=11]; '
          'edge [color="#555"]; ')

_EDGES: dict[str, list[tuple[str, str, str]]] = {
    "teacher_student": [("image", "frozen teacher\n(pretrained)", ""), ("image", "student\n(trained on good)", ""),
                        ("frozen teacher\n(pretrained)", "compare features", ""),
                        ("student\n(trained on good)", "compare features", ""),
                        ("compare features", "anomaly map\n(where they disagree)", "")],
    "one_class": [("image", "encoder", ""), ("encoder", "distance to\ncentre of normal", "features"),
                  ("distance to\ncentre of normal", "score: outside\nthe boundary?", "")],
    "distribution": [("image", "pretrained\nfeatures", ""), ("pretrained\nfeatures", "invertible flow", ""),
                     ("invertible flow", "Gaussian space", "z"),
                     ("Gaussian space", "low likelihood\n= anomaly", "")],
    "memory_bank": [("good images", "pretrained\nfeatures", "fit"),
                    ("pretrained\nfeatures", "memory bank\nof patches", ""),
                    ("test image", "patch features", ""), ("patch features", "nearest match\nin the bank", ""),
                    ("memory bank\nof patches", "nearest match\nin the bank", ""),
                    ("nearest match\nin the bank", "far away\n= anomaly", "")],
    "autoencoder": [("image", "encoder", ""), ("encoder", "bottleneck", ""), ("bottleneck", "decoder", ""),
                    ("decoder", "reconstruction", ""), ("reconstruction", "difference\nwith input", ""),
                    ("image", "difference\nwith input", "")],
    "gan": [("image", "generator\n(encode, decode)", ""), ("generator\n(encode, decode)", "reconstruction", ""),
            ("reconstruction", "discriminator", "real or fake?"),
            ("reconstruction", "error / latent\nmismatch = anomaly", "")],
    "transformer": [("image", "patches", "split"), ("patches", "self-attention\nacross patches", "tokens"),
                    ("self-attention\nacross patches", "rebuild / score\neach patch", ""),
                    ("rebuild / score\neach patch", "anomaly map", "")],
    "weakly_supervised": [("many good images", "model", ""), ("a few labelled\ndefects", "model", "push apart"),
                          ("model", "score: how far\nfrom normal", "")],
}


def family_diagram(family: str) -> str:
    """DOT source of the block diagram of `family`; a plain 'image -> model -> score' one for unknown families."""
    edges = _EDGES.get(family, [("image", "model", ""), ("model", "anomaly score", "")])
    lines = []
    for a, b, label in edges:
        attr = f' [label="{label}"]' if label else ""
        lines.append(f'"{a}" -> "{b}"{attr};')
    return "digraph {" + _STYLE + " ".join(lines) + "}"


def known_families() -> list[str]:
    """Families with a drawn diagram."""
    return list(_EDGES)
