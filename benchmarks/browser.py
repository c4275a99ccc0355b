"""Headless Chromium for the dashboard's browser test and its screenshot: Debian's
`chromium` and `chromium-driver` packages (apt-get install chromium chromium-driver; .ci/run
installs them), driven by selenium (the [test] extras) through the system chromedriver:
nothing is downloaded at run time."""

from __future__ import annotations

import os
import shutil
from typing import Optional

BROWSERS = ('chromium', 'chromium-browser', 'google-chrome')


def missing() -> Optional[str]:
  """Returns why no headless Chromium can be driven here (a sentence naming what to
  install), or None when selenium, a Chromium and its chromedriver are all there."""
  try:
    import selenium  # noqa: F401
  except ImportError:
    return "selenium is not installed; expected it from pip install -e '.[test]'"
  if not any(shutil.which(b) for b in BROWSERS):
    return ('no Chromium found (looked for ' + ', '.join(BROWSERS) + '); expected Debian\'s '
            'package: apt-get install chromium chromium-driver')
  if not shutil.which('chromedriver'):
    return ('no chromedriver found; expected Debian\'s package: apt-get install '
            'chromium-driver')
  return None


def chromium(width: int = 1400, height: int = 1800):
  """Returns a selenium Chrome driver of a headless Chromium, `width` x `height` CSS pixels
  at scale 1, whose console messages are kept (driver.get_log('browser')); RuntimeError
  with `missing()`'s reason where there is none. The caller quits it."""
  reason = missing()
  if reason:
    raise RuntimeError(reason)
  from selenium import webdriver
  from selenium.webdriver.chrome.service import Service
  os.environ.setdefault('SE_OFFLINE', 'true')   # selenium's own manager: never download
  options = webdriver.ChromeOptions()
  options.binary_location = next(shutil.which(b) for b in BROWSERS if shutil.which(b))
  for arg in ('--headless=new', '--no-sandbox', '--disable-dev-shm-usage', '--disable-gpu',
              '--disable-extensions', '--no-first-run', '--force-device-scale-factor=1',
              '--hide-scrollbars', '--lang=en-GB', f'--window-size={width},{height}'):
    options.add_argument(arg)
  options.set_capability('goog:loggingPrefs', {'browser': 'ALL'})
  return webdriver.Chrome(service=Service(executable_path=shutil.which('chromedriver')),
                          options=options)
