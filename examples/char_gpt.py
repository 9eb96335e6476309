"""The char_gpt example workload with hybrid_lightning. Run: python examples/char_gpt.py [--steps N] [--plain]"""

from hybrid_lightning.examples.run import main

if __name__ == "__main__":
    main("char_gpt")
