"""Data sources (synthetic, hf, imagefolder, webdataset), image checks and the caption/feature datasets."""
