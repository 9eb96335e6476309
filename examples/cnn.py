"""The cnn example workload with hybrid_lightning. Run: python examples/cnn.py [--steps N] [--plain]"""

from hybrid_lightning.examples.run import main

if __name__ == "__main__":
    main("cnn")
