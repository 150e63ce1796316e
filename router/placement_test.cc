#include "router/placement.h"
