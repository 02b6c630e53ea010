"""Mixture of experts from dense models or ``model+adapter`` references, from mergekit-moe configs."""
