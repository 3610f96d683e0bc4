"""The QGait pipeline: stage 0 (fp), stage 1 (QAT, straight-through), stage 2 (soft + IDC),
conversion to packed integer models, and the demo."""
