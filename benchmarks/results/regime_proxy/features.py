"""Cache frozen features (no prompt, mean pooled, L2-normalised, max_length 256) of the deduped corpus,
and label-text embeddings for each regime's label texts. Uses the product's own backbone/encoding code."""
import csv
import torch
from fedprompt.common.backbone import load_backbone
from fedprompt.common.encoding import encode
from fedprompt.common.model import PromptConfig
from fedprompt.common.zeroshot import label_prototypes

torch.set_num_threads(2)
CSV = "/work/shared/data/medical-abstracts/medical_tc_test.csv"
rows = list(csv.DictReader(open(CSV, newline="", encoding="utf-8")))
by_text: dict[str, set[int]] = {}
for r in rows:
    by_text.setdefault(r["medical_abstract"], set()).add(int(r["condition_label"]) - 1)
texts, labels = [], []
seen = set()
for r in rows:  # corpus order; drop conflicting texts (all copies), one copy of exact duplicates
    t = r["medical_abstract"]
    if len(by_text[t]) > 1 or t in seen:
        continue
    seen.add(t)
    texts.append(t)
    labels.append(int(r["condition_label"]) - 1)
print("kept", len(texts), "of", len(rows))
bb = load_backbone(None)
enc = encode(bb.tokenizer, texts, labels, 256)
ids, mask, y = enc.dataset.tensors
order = torch.argsort(mask.sum(1))  # similar lengths per batch: less padding to compute
feats = torch.zeros(len(texts), bb.model.config.hidden_size)
with torch.no_grad():
    for s in range(0, len(texts), 32):
        ix = order[s : s + 32]
        m = mask[ix]
        L = int(m.sum(1).max())
        h = bb.model(input_ids=ids[ix, :L], attention_mask=m[:, :L]).last_hidden_state.float()
        mm = m[:, :L].unsqueeze(-1).float()
        feats[ix] = torch.nn.functional.normalize((h * mm).sum(1) / mm.sum(1).clamp(min=1), dim=-1)
        if s % 640 == 0:
            print(s, flush=True)
names = ["neoplasms", "digestive system diseases", "nervous system diseases", "cardiovascular diseases",
         "general pathological conditions"]
desc = ["abnormal growth of tissue: tumours, cancers and their treatment",
        "disorders of the stomach, intestines, liver, pancreas and bowel",
        "disorders of the brain, spinal cord and nerves",
        "disorders of the heart, arteries, veins and blood pressure",
        "conditions not specific to one organ: infection, inflammation, injury, symptoms and complications"]
codes = [f"C{i+1}" for i in range(5)]
cfg = PromptConfig(labels=names, hidden_size=bb.model.config.hidden_size, backbone_fingerprint=bb.fingerprint,
                   max_length=256, normalize=True)
lab = {
    "names": label_prototypes(bb, cfg, names),
    "code_desc": label_prototypes(bb, cfg, [f"{c}: {d}" for c, d in zip(codes, desc)]),
    "codes": label_prototypes(bb, cfg, codes),
}
torch.save({"x": feats, "y": y, "labels": lab, "truncated": enc.truncated}, "/work/scratch/study/features.pt")
print("truncated", enc.truncated, "saved")
