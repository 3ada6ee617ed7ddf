"""tracin text: a Hugging Face model and text files in, influence results out."""
