"""Evaluation: geometry metrics (F-Score, Chamfer, alignment), appearance metrics (CLIP similarity, PSNR, LPIPS,
mask IoU) and report writers."""
