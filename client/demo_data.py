"""Synthetic clinical notes for the demo workspace: no real patient, same label space as the
real corpus (Medical Abstracts), so a demo run exercises the same code path.

The notes are built to be learnable but not keyword-separable: symptoms overlap across classes,
notes negate other classes' symptoms ("denies chest pain"), past history mentions any class,
some assessments stay vague, and text carries abbreviations and typos, as real notes do.
Everything is drawn from one seeded generator: the same seed gives byte-identical files.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from .workspace import Row, write_workspace

LABELS = [
    "neoplasms",
    "digestive system diseases",
    "nervous system diseases",
    "cardiovascular diseases",
    "general pathological conditions",
]

# Per class: complaints, exam findings, assessments, plans. Overlaps are deliberate (a colon
# cancer bleeds like an ulcer; a brain tumour seizes like epilepsy; syncope is cardiac or neuro).
_COMPLAINTS = [
    [
        "unintentional weight loss",
        "a palpable breast lump",
        "night sweats",
        "painless jaundice",
        "hemoptysis",
        "a growing neck mass",
        "new headaches and one seizure",
        "rectal bleeding and change in bowel habits",
        "bone pain in the lower back",
        "early satiety",
        "a nonhealing skin lesion",
        "easy bruising and fatigue",
    ],
    [
        "epigastric pain",
        "N/V",
        "bloody diarrhea",
        "melena",
        "hematemesis",
        "RUQ pain after fatty meals",
        "dysphagia to solids",
        "heartburn",
        "abd distension",
        "constipation",
        "LLQ pain",
        "yellowing of the eyes",
    ],
    [
        "headache",
        "left-sided weakness",
        "numbness in both feet",
        "a witnessed seizure",
        "slurred speech",
        "tremor at rest",
        "double vision",
        "unsteady gait",
        "confusion",
        "facial droop",
        "tingling in the hands",
        "transient vision loss",
    ],
    [
        "CP",
        "chest pressure on exertion",
        "palpitations",
        "SOB",
        "DOE",
        "bilateral leg swelling",
        "orthopnea",
        "an episode of syncope",
        "claudication",
        "PND",
        "a racing heart",
        "jaw pain with exertion",
    ],
    [
        "fever",
        "generalized weakness",
        "malaise",
        "chills and rigors",
        "poor PO intake",
        "a spreading red rash",
        "dizziness on standing",
        "dysuria",
        "a swollen warm leg",
        "diffuse body aches",
        "lethargy",
        "a fall at home",
    ],
]
_EXAM = [
    [
        "cachectic",
        "firm fixed axillary lymph node",
        "hepatomegaly with a nodular edge",
        "supraclavicular lymphadenopathy",
        "3 cm irregular breast mass",
        "pallor",
    ],
    [
        "epigastric tenderness",
        "positive Murphy sign",
        "guaiac positive stool",
        "scleral icterus",
        "hypoactive bowel sounds",
        "shifting dullness",
    ],
    [
        "4/5 strength L arm and leg",
        "positive Romberg",
        "decreased sensation stocking distribution",
        "nystagmus",
        "cogwheel rigidity",
        "neck stiffness",
    ],
    [
        "irregularly irregular rhythm",
        "III/VI systolic murmur",
        "JVD to the jaw",
        "bibasilar crackles",
        "2+ pitting edema",
        "diminished pedal pulses",
    ],
    [
        "dry mucous membranes",
        "warm erythematous skin",
        "diffuse rash",
        "tachycardic, febrile",
        "poor skin turgor",
        "CVA tenderness",
    ],
]
_ASSESSMENT = [
    [
        "adenocarcinoma of the colon",
        "non-small cell lung carcinoma",
        "metastatic breast cancer",
        "diffuse large B-cell lymphoma",
        "glioblastoma",
        "pancreatic adenocarcinoma",
        "hepatocellular carcinoma",
        "melanoma",
        "multiple myeloma",
    ],
    [
        "peptic ulcer disease",
        "acute cholecystitis",
        "Crohn disease flare",
        "acute pancreatitis",
        "alcoholic cirrhosis",
        "diverticulitis",
        "GERD with esophagitis",
        "ulcerative colitis",
        "upper GI bleed",
    ],
    [
        "acute ischemic stroke",
        "multiple sclerosis relapse",
        "Parkinson disease",
        "epilepsy",
        "migraine with aura",
        "Guillain-Barre syndrome",
        "peripheral neuropathy",
        "bacterial meningitis",
        "TIA",
    ],
    [
        "NSTEMI",
        "new onset atrial fibrillation",
        "decompensated CHF",
        "hypertensive urgency",
        "severe aortic stenosis",
        "unstable angina",
        "peripheral arterial disease",
        "DVT",
        "cardiomyopathy",
    ],
    [
        "sepsis",
        "dehydration",
        "hyponatremia",
        "cellulitis",
        "urosepsis",
        "anaphylaxis",
        "iron deficiency anemia",
        "heat exhaustion",
        "failure to thrive",
    ],
]
_PLAN = [
    [
        "oncology referral",
        "CT chest/abd/pelvis for staging",
        "biopsy scheduled",
        "tumor board review",
        "start chemotherapy",
    ],
    ["GI consult", "start PPI", "EGD in AM", "NPO, IV fluids", "LFTs and lipase", "colonoscopy"],
    ["neuro consult", "MRI brain", "EEG", "LP if no contraindication", "neuro checks q4h", "start levetiracetam"],
    ["cardiology consult", "serial troponins", "echo", "start heparin gtt", "diurese with IV furosemide", "telemetry"],
    [
        "blood cultures x2",
        "start empiric antibiotics",
        "IV fluid bolus",
        "replete electrolytes",
        "PT/OT eval",
        "trend lactate",
    ],
]
_SHARED_SYMPTOMS = [
    "fatigue",
    "nausea",
    "dizziness",
    "weight loss",
    "decreased appetite",
    "back pain",
    "fever",
    "SOB",
    "weakness",
    "insomnia",
]
_DURATIONS = [
    "x2d",
    "x 3 days",
    "for 1 week",
    "for several weeks",
    "since yesterday",
    "over the past 2 months",
    "for 10 days",
    "since this morning",
]
_OPENERS = ["presents with", "c/o", "reports", "here for", "referred for", "BIBA with"]
_VAGUE = [
    "etiology unclear, broad workup pending",
    "likely multifactorial",
    "r/o serious cause, observe",
    "unclear, will reassess after labs",
]


def _typo(rng: random.Random, word: str) -> str:
    i = rng.randrange(len(word) - 1)
    if rng.random() < 0.5:
        return word[:i] + word[i + 1] + word[i] + word[i + 2 :]  # swapped letters
    return word[:i] + word[i + 1 :]  # dropped letter


def _noisy(rng: random.Random, text: str, rate: float = 0.03) -> str:
    return " ".join(_typo(rng, w) if len(w) > 4 and w.isalpha() and rng.random() < rate else w for w in text.split(" "))


def _pick(rng: random.Random, label: int, pools: list[list[str]], own: float) -> str:
    """Mostly from the note's own class; otherwise from another class (co-morbidity, confusion)."""
    cls = label if rng.random() < own else rng.choice([c for c in range(len(pools)) if c != label])
    return rng.choice(pools[cls])


def demo_note(rng: random.Random, label: int) -> str:
    """One synthetic note of class `label` (index into LABELS)."""
    age = rng.randint(19, 94)
    who = rng.choice(
        [
            f"{age} yo {rng.choice('MF')}",
            f"{age}yo {rng.choice('MF')}",
            f"{age}-year-old {rng.choice(['man', 'woman'])}",
            f"pt is a {age} y/o {rng.choice(['male', 'female'])}",
        ]
    )
    cc = _pick(rng, label, _COMPLAINTS, 0.8)
    symptoms = [_pick(rng, label, _COMPLAINTS, 0.65) for _ in range(rng.randint(0, 2))]
    symptoms += rng.sample(_SHARED_SYMPTOMS, rng.randint(0, 2))
    symptoms = [s for s in dict.fromkeys(symptoms) if s != cc]
    history = rng.sample([a for pool in _ASSESSMENT for a in pool], rng.randint(0, 2))
    hpi = (
        f"{who} {'w/ hx of ' + ' and '.join(history) + ', ' if history else ''}{rng.choice(_OPENERS)} {cc} "
        f"{rng.choice(_DURATIONS)}."
    )
    if symptoms:
        hpi += f" Also notes {', '.join(symptoms)}."
    # Negated findings, from any class (including the note's own: "no seizure activity").
    denied = {rng.choice(rng.choice(_COMPLAINTS)) for _ in range(rng.randint(0, 3))} - {cc, *symptoms}
    if denied:
        hpi += f" {rng.choice(['Denies', 'No', 'Neg for'])} {', '.join(sorted(denied))}."
    exam = [_pick(rng, label, _EXAM, 0.7) for _ in range(rng.randint(0, 2))]
    vitals = (
        f"BP {rng.randint(92, 178)}/{rng.randint(52, 104)}, HR {rng.randint(54, 128)}, T {rng.uniform(36.2, 39.4):.1f}"
    )
    roll = rng.random()
    if roll < 0.75:
        assessment = _pick(rng, label, _ASSESSMENT, 0.92)
    elif roll < 0.9:  # a differential: the answer and a competitor, in either order
        pair = [_pick(rng, label, _ASSESSMENT, 1.0), _pick(rng, label, _ASSESSMENT, 0.0)]
        rng.shuffle(pair)
        assessment = f"ddx {pair[0]} vs {pair[1]}"
    else:
        assessment = rng.choice(_VAGUE)
    plan = _pick(rng, label, _PLAN, 0.75)
    lines = [
        f"CC: {cc}",
        f"HPI: {hpi}",
        f"PE: {vitals}{'; ' + ', '.join(exam) if exam else ''}",
        f"A/P: {assessment}. {plan[0].upper() + plan[1:]}.",
    ]
    return _noisy(rng, "\n".join(lines))


@dataclass
class DemoData:
    labels: list[str]
    hospitals: dict[str, tuple[list[Row], list[Row]]]  # id -> (train, validation)
    test: list[Row]
    local_tests: dict[str, list[Row]] = field(default_factory=dict)  # id -> its own held-out notes


def _dirichlet(rng: random.Random, alpha: float, k: int) -> list[float]:
    draws = [rng.gammavariate(alpha, 1.0) for _ in range(k)]
    total = sum(draws)
    return [d / total for d in draws]


# Notes per hospital in the default demo: at 200 the DP noise of three small sites outweighed what
# they learn (test macro-F1 0.44 after 20 rounds against 0.52 at the zero-shot start); at 600 the
# private federation ends well above its start (BENCHMARKS.md, "The demo").
PER_HOSPITAL = 600


def generate_demo(
    *,
    hospitals: int = 3,
    per_hospital: int = PER_HOSPITAL,
    test_size: int = 200,
    seed: int = 0,
    alpha: float = 1.0,
    local_test: int = 40,
) -> DemoData:
    """`hospitals` label-skewed sites (Dirichlet(alpha) class mix each), each with `per_hospital`
    notes split 80/20 into train/validation and `local_test` more notes of its own mix held out,
    plus a class-balanced held-out test set."""
    if hospitals < 1 or per_hospital < 1 or test_size < 0 or alpha <= 0 or local_test < 0:
        raise ValueError("need hospitals >= 1, per_hospital >= 1, test_size >= 0, local_test >= 0 and alpha > 0")
    rng = random.Random(seed)
    k = len(LABELS)
    sites: dict[str, tuple[list[Row], list[Row]]] = {}
    mixes: dict[str, list[float]] = {}
    for h in range(1, hospitals + 1):
        mixes[str(h)] = mix = _dirichlet(rng, alpha, k)
        ys = rng.choices(range(k), weights=mix, k=per_hospital)
        rows = [(demo_note(rng, y), LABELS[y]) for y in ys]
        n_val = per_hospital // 5
        sites[str(h)] = (rows[n_val:], rows[:n_val])
    test_ys = [i % k for i in range(test_size)]
    rng.shuffle(test_ys)
    test = [(demo_note(rng, y), LABELS[y]) for y in test_ys]
    # Drawn last, from the same generator: the sites' train/validation and the test set stay the
    # notes a seed gave before local tests existed.
    local_tests = {}
    for hid, mix in mixes.items():
        ys = rng.choices(range(k), weights=mix, k=local_test)
        local_tests[hid] = [(demo_note(rng, y), LABELS[y]) for y in ys]
    return DemoData(list(LABELS), sites, test, local_tests)


def write_demo_workspace(
    out_dir: str | Path, demo: DemoData, *, allow_non_private: bool = False, backbone: Path | None = None
) -> Path:
    """A ready-to-run demo workspace, its sites with the recommended private settings (lifetime cap
    8, no non-private rounds) unless `allow_non_private` lets them run reference runs without DP;
    `backbone`: the sites' local backbone directory (default: the embedded one)."""
    return write_workspace(
        out_dir,
        name="demo",
        labels=demo.labels,
        hospitals=demo.hospitals,
        test_rows=demo.test,
        local_tests=demo.local_tests,
        allow_non_private=allow_non_private,
        backbone=backbone,
    )
