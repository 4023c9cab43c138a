"""The chosen plan against hand-tuned baselines, predicted beside measured."""
