"""vggt-cache training side: Qwen2.5-VL fused with VGGT features, cached or computed online."""
