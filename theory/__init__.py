"""The paper's results in our words (README.md) and executable checks of them (checks/)."""
