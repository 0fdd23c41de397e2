"""The embedded transfer task: scikit-learn digits 0–4 → 5–9."""
