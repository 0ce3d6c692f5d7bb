"""Backdoor-robustness certification of on-device text classifiers (FRS, fuzzed randomized smoothing).

    from edgerun.robustness import TextClassifier, FRSConfig, certify
    clf = TextClassifier.load("sst2-classifier/", task="sst2")
    cert = certify(clf, ["a gorgeous , witty , seductive movie ."])[0]
    print(cert.label_name, cert.p_a_lower, cert.radius_edits, cert.area_words)

:mod:`edgerun.robustness.classifier` holds the classifiers (trained head or prompted label words),
:mod:`edgerun.robustness.frs` the method (search, randomization, parameter smoothing, certificate).
Nothing here is imported by ``import edgerun`` (torch is loaded only when a classifier is).
"""

from edgerun.robustness.classifier import TASKS, TextClassifier, get_task, has_head
from edgerun.robustness.frs import (Certificate, FRSConfig, ParameterSmoother, ablation, certified_radius, certify,
                                    clopper_pearson_lower, find_vulnerable_spans, radius_ratio, randomize)

__all__ = ["TASKS", "TextClassifier", "get_task", "has_head", "Certificate", "FRSConfig", "ParameterSmoother",
           "ablation", "certified_radius", "certify", "clopper_pearson_lower", "find_vulnerable_spans",
           "radius_ratio", "randomize"]
