"""`python -m latent.lpips convert ...`: the LPIPS-VGG weight converter's command, under the
name users and error messages give; the module is latent/vae/lpips.py."""

import sys

from latent.vae.lpips import main

if __name__ == '__main__':
  main(sys.argv[1:])
