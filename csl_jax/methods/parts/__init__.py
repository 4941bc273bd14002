"""Pieces several methods share: losses, pseudo-label selection, passes with a BN policy, views, EMA teacher.

    losses         CE with ignore, OHEM, weighted unlabeled CE (per loss group)
    pseudo_labels  the CSL selector and the confidence threshold
    passes         train/eval passes, pseudo-label targets and their metrics
    views          CutMix pasting and TMP masking inside the step
    teacher        EMA of params and BN statistics
    resize         PyTorch legacy 'nearest' downsampling (U2PL's and CSS's maps at feature stride)

A method's own pieces live beside it, in its folder (csl_jax/methods/<name>/). The former
`<method>_*.py` modules here (u2pl_contrastive, css_losses, ...) are deprecated aliases of them.
"""
